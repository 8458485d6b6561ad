"""The MC-Distil evidence table on digits: CE, KD, Meta-Distil, MC-Distil-NoPS and MC-Distil.

Everything runs through the real command line (``collab-distill fit``), one process per run, with
``examples/digits.yaml`` composed with one method file of ``examples/methods/``:

* for every seed S, first the CE run; it trains the teacher with the config's ``train_epochs`` and
  stores it as ``teachers/teacher/teacher.pt`` in its run folder;
* then KD, Meta-Distil, MC-Distil-NoPS and MC-Distil with the same seed, all loading exactly that
  file (``--cohort.teachers.teacher.checkpoint <file> --cohort.teachers.teacher.train_epochs 0``),
  so all methods of one seed share the teacher, the students' initial weights, the data
  splits, the data order and the augmentation.

Reported (``digits_methods.{json,md}``): per student the mean ± std over seeds of test top-1 with
last-epoch and best-on-val weights; the paired per-seed difference of every method vs KD; whether
MC-Distil beats KD; the median student-epoch time of every method and the ratios MC-Distil / KD and
Meta-Distil / KD; and the C-Net's weights (alpha, beta, gamma per student) at the first and the last
logged training step, read from each run's ``logs/csv/metrics.csv``.

Usage::

    python benchmarks/digits_methods.py                       # seeds 0 1 2, the config's 15 epochs
    python benchmarks/digits_methods.py --seeds 0 1 2 --epochs 3 --out benchmarks/out/methods_quick
    python benchmarks/digits_methods.py --reuse               # pick up finished runs in --runs-dir
    python benchmarks/digits_methods.py --render-only         # rewrite the .md from the .json

The run folders go to ``--runs-dir`` (default ``benchmarks/out/digits_methods``, git-ignored).
"""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from digits_table import (  # noqa: E402
    CONFIG,
    REPO,
    STUDENTS,
    _p,
    _paired,
    _pm,
    _portable,
    _summary,
    prepare_output,
    run_arguments,
    run_paired_seeds,
    write_outputs,
)

METHOD_DIR = REPO / "examples" / "methods"
# name in this script -> (method file, label); the order is the table's
METHODS: dict[str, tuple[Path, str]] = {
    "ce": (METHOD_DIR / "ce.yaml", "CE"),
    "kd": (METHOD_DIR / "kd.yaml", "KD"),
    "meta_distil": (METHOD_DIR / "meta_distil.yaml", "Meta-Distil"),
    "mc_distil_nops": (METHOD_DIR / "mc_distil_nops.yaml", "MC-Distil-NoPS"),
    "mc_distil": (METHOD_DIR / "mc_distil.yaml", "MC-Distil"),
    "mc_distil_image_only": (METHOD_DIR / "mc_distil_image_only.yaml", "MC-Distil, image-only C-Net (paper)"),
    "pooled_fixed": (METHOD_DIR / "pooled_fixed.yaml", "fixed 1/1/1 + PooledStudent"),
}
CNET_METHODS = ["mc_distil", "mc_distil_nops", "meta_distil", "mc_distil_image_only"]
WEIGHTS = ("alpha", "beta", "gamma")


def _float(x: str) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def cnet_trace(run_dir: Path) -> dict[str, Any]:
    """From ``logs/csv/metrics.csv``: per student alpha/beta/gamma at the first and last logged
    training step (and their min/max over the run), plus the meta loss at its first/last step."""
    files = sorted(run_dir.glob("logs/**/metrics.csv"))
    if not files:
        return {}
    with files[0].open() as f:
        rows = list(csv.DictReader(f))
    out: dict[str, Any] = {"students": {}}
    for student in STUDENTS:
        per: dict[str, Any] = {}
        for w in WEIGHTS:
            col = f"train/{student}/{w}"
            series = [(int(float(r["step"])), v) for r in rows if (v := _float(r.get(col, ""))) is not None]
            if series:
                per[w] = {"first_step": series[0][0], "first": series[0][1], "last_step": series[-1][0],
                          "last": series[-1][1], "min": min(v for _, v in series), "max": max(v for _, v in series),
                          "n": len(series)}
        out["students"][student] = per
    meta = [(int(float(r["step"])), v) for r in rows if (v := _float(r.get("train/meta/loss", ""))) is not None]
    if meta:
        out["meta_loss"] = {"first_step": meta[0][0], "first": meta[0][1], "last_step": meta[-1][0], "last": meta[-1][1],
                            "n_logged": len(meta)}
    return out


def collect(per_seed: dict[int, dict[str, dict[str, Any]]]) -> dict[str, Any]:
    seeds = sorted(per_seed)
    table: dict[str, Any] = {}
    for student in STUDENTS:
        row: dict[str, Any] = {"params": per_seed[seeds[0]]["ce"]["students"][student]["params"]}
        for method in METHODS:
            cell: dict[str, Any] = {}
            for which in ("last", "best_on_val"):
                acc = [per_seed[s][method]["students"][student][which]["test_top1"] for s in seeds]
                cell[which] = _summary(acc)
                if method != "kd":
                    diffs = [a - per_seed[s]["kd"]["students"][student][which]["test_top1"] for a, s in zip(acc, seeds)]
                    d = _paired(diffs)
                    d["above_kd"] = d.pop("kd_better")
                    d["below_kd"] = d.pop("ce_better")
                    cell[f"minus_kd_{which}"] = {"per_seed": diffs, **d}
            row[method] = cell
        table[student] = row
    return table


def _diff(d: dict[str, Any]) -> str:
    return f"{d['mean']:+.2f} ± {d['std']:.2f} ({d['above_kd']}↑ {d['below_kd']}↓ {d['ties']}=)"


def verdict(student: str, row: dict[str, Any], method: str = "mc_distil") -> str:
    d = row[method]["minus_kd_last"]
    b = row[method]["minus_kd_best_on_val"]
    n = d["n"]
    p = d.get("p_two_sided")
    count = f"above KD on {d['above_kd']}/{n} seeds, below on {d['below_kd']}, tied on {d['ties']}"
    tail = f" (best-on-val: {b['mean']:+.2f} ± {b['std']:.2f}, {b['above_kd']}↑ {b['below_kd']}↓)"
    if p is not None and p < 0.05 and (d["above_kd"] == n or d["below_kd"] == n):
        word = "beats" if d["mean"] > 0 else "is worse than"
        return (f"**{student}**: MC-Distil {word} KD by {abs(d['mean']):.2f} points (last epoch, paired; {count}; "
                f"p {_p(p)}){tail}.")
    if d["above_kd"] == n and d["mean"] > 0:
        return (f"**{student}**: MC-Distil is above KD on every seed ({d['mean']:+.2f} ± {d['std']:.2f} points, last "
                f"epoch; paired t-test p {_p(p)}), but with {n} seeds that is not conclusive{tail}.")
    if d["below_kd"] == n and d["mean"] < 0:
        return (f"**{student}**: MC-Distil is below KD on every seed ({d['mean']:+.2f} ± {d['std']:.2f} points, last "
                f"epoch; paired t-test p {_p(p)}), not conclusive with {n} seeds{tail}.")
    return (f"**{student}**: no, not distinguishable from KD: MC-Distil − KD = {d['mean']:+.2f} ± {d['std']:.2f} points "
            f"(last epoch; {count}; paired t-test p {_p(p)}), within the seed-to-seed noise{tail}.")


def markdown(res: dict[str, Any]) -> str:
    s = res["settings"]
    env = res["environment"]
    labels = {m: lab for m, lab in res["labels"].items()}
    lines = [
        "# Digits: CE, KD, Meta-Distil, MC-Distil-NoPS, MC-Distil (examples/digits.yaml)",
        "",
        f"Seeds {', '.join(map(str, s['seeds']))}, paired: all methods of one seed share the teacher (trained once per "
        f"seed by the CE run, {s['teacher_epochs']} epochs, then loaded), the students' initial weights, splits, data "
        f"order and augmentation. {s['student_epochs']} student epochs. Test split: {res['test_size']} images (one image = "
        f"{100 / res['test_size']:.2f} points); val {res['val_size']}, meta {res.get('meta_size', '?')}. Method files: "
        + ", ".join(f"{labels[m]} `{f}`" for m, f in s["methods"].items())
        + f". {env['platform']}, {env['cpu_count']} CPU cores, OMP_NUM_THREADS={s['threads'] or 'default'}.",
        "",
        f"Teacher ResNet(m) test top-1: {_pm(res['teacher_test_top1'])} (identical across the methods of a seed).",
        "",
        "Test top-1 (%), mean ± std over seeds; \"− KD\" is the paired per-seed difference to KD (mean ± std; ↑/↓/= "
        "count the seeds above/below/equal to KD).",
        "",
    ]
    for which, title in (("last", "last epoch"), ("best_on_val", "best-on-val weights")):
        lines += [f"**{title}**", "",
                  "| student | params | " + " | ".join(labels[m] for m in res["methods"]) + " | "
                  + " | ".join(f"{labels[m]} − KD" for m in res["methods"] if m != "kd") + " |",
                  "|---|---|" + "---|" * (2 * len(res["methods"]) - 1)]
        for student, row in res["table"].items():
            lines.append(f"| {student} | {row['params'] / 1e3:.1f}K | "
                         + " | ".join(_pm(row[m][which]) for m in res["methods"]) + " | "
                         + " | ".join(_diff(row[m][f"minus_kd_{which}"]) for m in res["methods"] if m != "kd") + " |")
        lines.append("")
    lines += [
        "Per-seed MC-Distil − KD (last epoch), points: " + "; ".join(
            f"{st}: " + ", ".join(f"{d:+.2f}" for d in row["mc_distil"]["minus_kd_last"]["per_seed"])
            for st, row in res["table"].items()),
        "",
        "**Does MC-Distil beat KD?** " + " ".join(verdict(st, row) for st, row in res["table"].items()),
        "",
        *([f"**The same for {labels['mc_distil_image_only']}** (wording says MC-Distil): "
           + " ".join(verdict(st, row, "mc_distil_image_only") for st, row in res["table"].items()), ""]
          if "mc_distil_image_only" in res["methods"] else []),
        "## Cost",
        "",
        "| method | wall s per run | student epoch s (median over epochs, mean ± std over seeds) "
        "| median epoch / KD | fastest epoch / KD |",
        "|---|---|---|---|---|",
    ]
    t = res["timing"]
    for m in res["methods"]:
        extra = " (incl. training the teacher)" if m == "ce" else ""
        lines.append(f"| {labels[m]}{extra} | {_pm(t['wall_s'][m])} "
                     f"| {t['epoch_s'][m]['mean']:.3f} ± {t['epoch_s'][m]['std']:.3f} "
                     f"| {t['ratio_vs_kd'][m]['mean']:.2f} ± {t['ratio_vs_kd'][m]['std']:.2f} "
                     + (f"| {t['ratio_min_vs_kd'][m]['mean']:.2f} ± {t['ratio_min_vs_kd'][m]['std']:.2f} |"
                        if "ratio_min_vs_kd" in t else "| |"))
    r_mc, r_meta = t["ratio_vs_kd"]["mc_distil"], t["ratio_vs_kd"]["meta_distil"]
    every = s.get("meta_every")
    lines += [
        "",
        f"Epoch-time ratio **MC-Distil / KD = {r_mc['mean']:.2f}**, **Meta-Distil / KD = {r_meta['mean']:.2f}** "
        f"(per seed, then mean; meta step every {every} steps; project goal ≤ 1.3: "
        f"{'met' if r_mc['mean'] <= 1.3 else 'not met'} for MC-Distil, {'met' if r_meta['mean'] <= 1.3 else 'not met'} "
        "for Meta-Distil). The epoch time includes data loading and, for the C-Net methods, the C-Net's forward pass on "
        "every step and the bilevel meta step; validation is excluded. Timings on a shared 2-core machine carry a few "
        "percent of noise.",
        "",
        "## The C-Net's weights",
        "",
        "Mean over seeds of the logged `train/<student>/alpha|beta|gamma` (batch means of the C-Net's outputs, logged "
        "every `trainer.log_every_n_steps` steps) at the first and the last logged training step; [min, max] over all "
        "logged steps of all seeds in brackets. KD uses alpha 0.3, beta 0.7, gamma 0.",
        "",
        "| method | student | first step | alpha first → last | beta first → last | gamma first → last |",
        "|---|---|---|---|---|---|",
    ]
    for m in res["cnet"]:
        for student, ws in res["cnet"][m].items():
            cells = []
            for w in WEIGHTS:
                c = ws.get(w)
                cells.append("—" if c is None else f"{c['first']:.3f} → {c['last']:.3f} [{c['min']:.3f}, {c['max']:.3f}]")
            step = ws.get("alpha", {}).get("steps", "")
            lines.append(f"| {labels[m]} | {student} | {step} | " + " | ".join(cells) + " |")
    ml = res.get("meta_loss", {})
    if ml:
        lines += ["", "Meta loss (`train/meta/loss`, sum of the students' CE on a meta batch), first → last logged, mean over "
                  "seeds: " + "; ".join(f"{labels[m]} {v['first']:.3f} → {v['last']:.3f} ({v['n_logged']} logged)"
                                        for m, v in ml.items()) + "."]
    else:
        lines += ["", "`train/meta/loss` does not appear in any run's metrics.csv: the engine runs the meta step when "
                  "`global_step % meta.every_n_steps == 0` *before* the step counter is incremented, so its log entry "
                  "belongs to steps k·every_n_steps + 1, and the CSV logger only writes steps that are multiples of "
                  "`trainer.log_every_n_steps` (10): with every_n_steps = 20 the meta loss is never logged."]
    lines += [
        "",
        f"Caveats: {len(s['seeds'])} seeds (a paired t-test with {len(s['seeds']) - 1} degrees of freedom detects only large, "
        f"consistent effects); one fixed {res['test_size']}-image test split for every seed, so the spread is training "
        f"noise; {len(res['methods'])} methods and three students without multiple-comparison correction; "
        "nothing was tuned on the test "
        "split (all methods use the method files' settings as they are).",
        "",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = run_arguments(__doc__.split("\n\n")[0], "digits_methods", [0, 1, 2, 3, 4])
    args = p.parse_args(argv)
    args.runs_dir = args.runs_dir.resolve()
    if prepare_output(p, args, "digits_methods", markdown):
        return 0
    started = time.perf_counter()

    per_seed, runs, teacher_hashes = run_paired_seeds({m: f for m, (f, _) in METHODS.items()}, args)

    seeds = sorted(per_seed)
    epoch_s = {m: {s: statistics.median(h["seconds"] for h in per_seed[s][m]["history"]) for s in seeds} for m in METHODS}
    epoch_min = {m: {s: min(h["seconds"] for h in per_seed[s][m]["history"]) for s in seeds} for m in METHODS}
    first = per_seed[seeds[0]]["ce"]
    teacher_json = Path(runs[seeds[0]]["ce"]["run_dir"]) / "teachers" / "teacher" / "results.json"
    teacher_results = json.loads(teacher_json.read_text()) if teacher_json.is_file() else {}
    from collab_distill.tasks.classification import (
        Digits,  # the config's test split (fixed test_seed)
    )

    sizes = Digits(meta_fraction=0.1, val_fraction=0.1).setup(seeds[0]).extra["split_sizes"]

    # the C-Net's weights: per method and student, mean over seeds of first/last, min/max over everything
    traces = {m: {s: cnet_trace(Path(runs[s][m]["run_dir"])) for s in seeds} for m in CNET_METHODS}
    cnet: dict[str, Any] = {}
    meta_loss: dict[str, Any] = {}
    for m in CNET_METHODS:
        cnet[m] = {}
        for student in STUDENTS:
            cnet[m][student] = {}
            for w in WEIGHTS:
                cells = [traces[m][s]["students"][student].get(w) for s in seeds if traces[m][s]]
                cells = [c for c in cells if c]
                if not cells:
                    continue
                cnet[m][student][w] = {
                    "first": statistics.fmean(c["first"] for c in cells), "last": statistics.fmean(c["last"] for c in cells),
                    "min": min(c["min"] for c in cells), "max": max(c["max"] for c in cells),
                    "steps": f"{cells[0]['first_step']} → {cells[0]['last_step']}",
                    "per_seed": {s: {k: c[k] for k in ("first", "last", "min", "max")} for s, c in zip(seeds, cells)},
                }
        ml = [traces[m][s]["meta_loss"] for s in seeds if traces[m][s].get("meta_loss")]
        if ml:
            meta_loss[m] = {"first": statistics.fmean(x["first"] for x in ml), "last": statistics.fmean(x["last"] for x in ml),
                            "n_logged": ml[0]["n_logged"]}

    meta_every = None
    cfg = Path(runs[seeds[0]]["mc_distil"]["run_dir"]) / "config.yaml"
    if cfg.is_file():
        import yaml  # jsonargparse's dependency

        meta_every = (yaml.safe_load(cfg.read_text()).get("meta") or {}).get("every_n_steps")

    res = {
        "environment": {"platform": platform.platform(), "python": sys.version.split()[0], "cpu_count": os.cpu_count()},
        "settings": {"seeds": seeds, "student_epochs": first["epochs"],
                     "teacher_epochs": teacher_results.get("epochs", args.teacher_epochs), "threads": args.threads,
                     "meta_every": meta_every, "config": str(CONFIG.relative_to(REPO)),
                     "methods": {m: str(f.relative_to(REPO)) for m, (f, _) in METHODS.items()}},
        "methods": list(METHODS),
        "labels": {m: lab for m, (_, lab) in METHODS.items()},
        "test_size": sizes["test"],
        "val_size": sizes["val"],
        "meta_size": sizes.get("meta"),
        "table": collect(per_seed),
        "teacher_test_top1": _summary([per_seed[s]["ce"]["teachers"]["teacher"]["test"]["top1"] for s in seeds]),
        "teacher_params": first["teachers"]["teacher"]["params"],
        "teacher_sha256": teacher_hashes,
        "per_seed": {s: {m: {st: {w: per_seed[s][m]["students"][st][w]["test_top1"] for w in ("last", "best_on_val")}
                             for st in STUDENTS} for m in METHODS} for s in seeds},
        "timing": {
            "wall_s": {m: _summary([runs[s][m]["wall_s"] for s in seeds]) for m in METHODS},
            "epoch_s": {m: _summary([epoch_s[m][s] for s in seeds]) for m in METHODS},
            "epoch_s_per_seed": {m: {s: epoch_s[m][s] for s in seeds} for m in METHODS},
            "ratio_vs_kd": {m: _summary([epoch_s[m][s] / epoch_s["kd"][s] for s in seeds]) for m in METHODS},
            # the fastest epoch is less sensitive to other jobs on a shared machine
            "epoch_min_s": {m: _summary([epoch_min[m][s] for s in seeds]) for m in METHODS},
            "ratio_min_vs_kd": {m: _summary([epoch_min[m][s] / epoch_min["kd"][s] for s in seeds]) for m in METHODS},
        },
        "cnet": cnet,
        "meta_loss": meta_loss,
        "runs": {s: {m: {"wall_s": r["wall_s"], "command": _portable(r["command"])} for m, r in v.items()}
                 for s, v in runs.items()},
        "elapsed_s": time.perf_counter() - started,
    }
    write_outputs(args.out, "digits_methods", res, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
