"""The seed methods on digits: CE, KD, MC-Distil, DML, KDCL (4 variants, with and without a view per
student), TAKD, DGKD, RMC, DSN, SD and MetaDistiller, with their cost relative to CE.

Every run is the real command line (``collab-distill fit --config examples/digits.yaml --config
examples/methods/<method>.yaml``), one process per run, the method files as they are (nothing is
tuned here, and nothing is ever selected on the test split). For every seed:

* the CE run trains the teacher (the config's 15 epochs) and stores it; the teacher methods (KD,
  MC-Distil, TAKD, DGKD, RMC) load exactly that file, so the methods of one seed share the
  teacher, the students' initial weights, the splits, the data order and the augmentation;
* the online methods (DML, KDCL, DSN, SD, MetaDistiller) have no teacher;
* DSN, SD and MetaDistiller wrap each student in a multi-exit network: the table reports the final
  exit (the deployed model, same size as the other methods' students) and, separately, the
  ensemble of the exits (more compute at inference).

Reported (``digits_collab.{json,md}``): per method and student, test top-1 mean ± std over seeds with
last-epoch and best-on-val weights; the paired per-seed difference to CE; and the cost: the
student-training seconds of a run (the sum of its epochs, validation excluded; the teacher's own
training excluded for every method) divided by CE's, per seed, then mean ± std.

Usage::

    python benchmarks/digits_collab.py                        # seeds 0 1 2, the config's 15 epochs
    python benchmarks/digits_collab.py --seeds 0 1 2 --epochs 2 --out benchmarks/out/collab_quick
    python benchmarks/digits_collab.py --reuse                # pick up finished runs in --runs-dir
    python benchmarks/digits_collab.py --render-only          # rewrite the .md from the .json
    python benchmarks/digits_collab.py --methods dml --merge  # rerun some rows, keep the others

``--merge`` reruns only ``--methods`` (and CE, for the pairing) with the seeds of the existing
``--out/digits_collab.json``, checks that CE reproduces its stored accuracies exactly (else the
rerun rows and the stored ones come from different code or a different machine, and it stops),
replaces those methods' rows (cost against the fresh CE runs) and leaves every other row as it
was; the Markdown lists the merged reruns with their date and note. ``--allow-ce-drift`` merges
even when CE does not reproduce: the merged rows' "− CE" and cost are then against the fresh CE
runs (recorded with the rerun) and the Markdown says that their absolute numbers are not
comparable with the other rows'.

MetaDistiller runs also report their generated targets on the val split (each run's
``plugins/metadistiller/targets.json``): mean entropy against the uniform ``log K`` and top-1
agreement with the labels, per student, mean over seeds (and over the early exits, then per exit).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
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
    _sha256,
    _summary,
    prepare_output,
    run_arguments,
    run_one,
    write_outputs,
)

METHOD_DIR = REPO / "examples" / "methods"
VIEWS = METHOD_DIR / "kdcl_views.yaml"


@dataclass(frozen=True)
class Method:
    file: str
    label: str
    teacher: bool = False
    views: bool = False
    exits: bool = False
    group: str = ""


METHODS: dict[str, Method] = {
    "ce": Method("ce", "CE", teacher=True, group="baselines"),
    "kd": Method("kd", "KD", teacher=True, group="baselines"),
    "mc_distil": Method("mc_distil", "MC-Distil", teacher=True, group="baselines"),
    "takd": Method("takd", "TAKD", teacher=True, group="teacher assistants and robust KD"),
    "dgkd": Method("dgkd", "DGKD", teacher=True, group="teacher assistants and robust KD"),
    "rmc": Method("rmc", "RMC", teacher=True, group="teacher assistants and robust KD"),
    "dml": Method("dml", "DML", group="online, no teacher"),
    "kdcl_naive": Method("kdcl_naive", "KDCL-Naive", group="online, no teacher"),
    "kdcl_linear": Method("kdcl_linear", "KDCL-Linear", group="online, no teacher"),
    "kdcl_minlogit": Method("kdcl_minlogit", "KDCL-MinLogit", group="online, no teacher"),
    "kdcl_general": Method("kdcl_general", "KDCL-General", group="online, no teacher"),
    "kdcl_naive_views": Method("kdcl_naive", "KDCL-Naive + views", views=True, group="online, no teacher"),
    "kdcl_linear_views": Method("kdcl_linear", "KDCL-Linear + views", views=True, group="online, no teacher"),
    "kdcl_minlogit_views": Method("kdcl_minlogit", "KDCL-MinLogit + views", views=True, group="online, no teacher"),
    "kdcl_general_views": Method("kdcl_general", "KDCL-General + views", views=True, group="online, no teacher"),
    "dsn": Method("dsn", "DSN", exits=True, group="self-boosting (multi-exit students)"),
    "sd": Method("sd", "SD", exits=True, group="self-boosting (multi-exit students)"),
    "metadistiller": Method("metadistiller", "MetaDistiller", exits=True, group="self-boosting (multi-exit students)"),
}


def _run_seed(seed: int, methods: dict[str, Method], args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any], str]:
    done = {"ce": run_one("ce", METHOD_DIR / "ce.yaml", seed, args, teacher=None)}
    teacher_file = done["ce"]["run_dir"] / "teachers" / "teacher" / "teacher.pt"
    if not teacher_file.is_file():
        raise SystemExit(f"the CE run of seed {seed} wrote no {teacher_file}")
    no_teacher = copy.copy(args)
    no_teacher.teacher_epochs = None  # the method file removes the teacher; pass no teacher flags
    for name, m in methods.items():
        if name == "ce":
            continue
        extra = ("--config", str(VIEWS)) if m.views else ()
        if m.teacher:
            done[name] = run_one(name, METHOD_DIR / f"{m.file}.yaml", seed, args, teacher=teacher_file, extra=extra)
        else:
            done[name] = run_one(name, METHOD_DIR / f"{m.file}.yaml", seed, no_teacher, teacher=None, extra=extra)
    results = {n: json.loads((r["run_dir"] / "results.json").read_text()) for n, r in done.items()}
    t_ce = results["ce"]["teachers"]["teacher"]["test"]["top1"]
    for n, r in results.items():
        teacher = r["teachers"].get("teacher") if methods[n].teacher else None
        if teacher is not None and teacher.get("test", {}).get("top1", t_ce) != t_ce:
            raise SystemExit(f"seed {seed}: the teacher's test top-1 differs between CE ({t_ce}) and {n}")
        if not methods[n].teacher and r["teachers"]:
            raise SystemExit(f"seed {seed}: {n} is an online method but its run has teachers {sorted(r['teachers'])}")
    return results, done, _sha256(teacher_file)


def train_seconds(results: dict[str, Any]) -> float:
    """Seconds of student training in a run: the sum over its epochs (all stages of a staged run)."""
    return sum(row["seconds"] for row in results["history"])


def collect(per_seed: dict[int, dict[str, Any]], methods: dict[str, Method]) -> dict[str, Any]:
    seeds = sorted(per_seed)
    table: dict[str, Any] = {}
    for name, m in methods.items():
        row: dict[str, Any] = {}
        for student in STUDENTS:
            cell: dict[str, Any] = {}
            keys = ["test_top1", "test_ensemble_top1"] if m.exits else ["test_top1"]
            for which in ("last", "best_on_val"):
                for key in keys:
                    acc = [per_seed[s][name]["students"][student][which][key] for s in seeds]
                    tag = "" if key == "test_top1" else "_ensemble"
                    cell[f"{which}{tag}"] = {**_summary(acc), "per_seed": acc}
                    if name != "ce":
                        ce = [per_seed[s]["ce"]["students"][student][which]["test_top1"] for s in seeds]
                        cell[f"minus_ce_{which}{tag}"] = _paired([a - c for a, c in zip(acc, ce)])
            row[student] = cell
        ratio = [train_seconds(per_seed[s][name]) / train_seconds(per_seed[s]["ce"]) for s in seeds]
        row["cost_vs_ce"] = _summary(ratio)
        row["train_s"] = _summary([train_seconds(per_seed[s][name]) for s in seeds])
        table[name] = row
    return table


def metadistiller_targets(runs: dict[int, dict[str, Any]]) -> dict[str, Any] | None:
    """Per student, over seeds: the generated targets' val entropy (nats, and / log K) and top-1
    agreement with the labels, from each MetaDistiller run's ``plugins/metadistiller/targets.json``
    (mean over the early exits; ``per_exit`` keeps the exits apart)."""
    files = {s: r["metadistiller"]["run_dir"] / "plugins" / "metadistiller" / "targets.json"
             for s, r in runs.items() if "metadistiller" in r}
    if not files or not all(f.is_file() for f in files.values()):
        return None
    stats = {s: json.loads(f.read_text()) for s, f in sorted(files.items())}
    first = next(iter(stats.values()))
    out: dict[str, Any] = {"log_k": first["log_k"], "split": first["split"], "temperature": first["temperature"], "students": {}}
    for student in STUDENTS:
        per = [stats[s]["students"][student] for s in stats]
        out["students"][student] = {
            "entropy": _summary([p["entropy"] for p in per]),
            "entropy_over_log_k": _summary([p["entropy_over_log_k"] for p in per]),
            "label_agreement": _summary([100 * p["label_agreement"] for p in per]),
            "per_exit": [{"exit": k + 1,
                          "entropy_over_log_k": _summary([p["exits"][k]["entropy_over_log_k"] for p in per]),
                          "label_agreement": _summary([100 * p["exits"][k]["label_agreement"] for p in per])}
                         for k in range(len(per[0]["exits"]))],
        }
    return out


def _diff(d: dict[str, Any]) -> str:
    arrow = f"{d['kd_better']}↑ {d['ce_better']}↓"
    return f"{d['mean']:+.2f} ({arrow}, p {_p(d.get('p_two_sided'))})"


def markdown(res: dict[str, Any]) -> str:
    s = res["settings"]
    labels, groups = res["labels"], res["groups"]
    n = len(s["seeds"])
    lines = [
        "# Digits: the seed methods side by side (examples/digits.yaml + examples/methods/)",
        "",
        f"Seeds {', '.join(map(str, s['seeds']))}, paired (each method's seed-k run shares with CE's seed-k run the "
        "students' initial weights, splits, data order and augmentation; the teacher methods also share CE's teacher, "
        f"trained once per seed for {s['teacher_epochs']} epochs). {s['student_epochs']} student epochs per run (per "
        f"stage for TAKD/DGKD). Test split {res['test_size']} images (one image = {100 / res['test_size']:.2f} points), "
        f"val {res['val_size']}, meta {res['meta_size']}. Teacher ResNet(m) test top-1 {_pm(res['teacher_test_top1'])}. "
        f"{res['environment']['platform']}, {res['environment']['cpu_count']} CPU cores, OMP_NUM_THREADS={s['threads']}.",
        "",
        "Test top-1 (%), mean ± std over seeds. \"− CE\": paired per-seed difference to CE, mean (seeds above↑ / "
        f"below↓ CE, paired t-test p; {n} seeds detect only large, consistent effects). Cost: the run's student-training "
        "seconds (sum of its epochs; validation and the teacher's own training excluded) / CE's, per seed, mean ± std. "
        "For DSN / SD / MetaDistiller the student is a multi-exit network: \"top-1\" is its final exit (the same "
        "network and size as the other methods' students, the exit heads dropped at deployment); the ensemble of "
        "its exits is the second table.",
        "",
    ]
    for which, title in (("last", "last epoch"), ("best_on_val", "best-on-val weights")):
        lines += [f"## {title}", "",
                  "| method | " + " | ".join(STUDENTS) + " | " + " | ".join(f"{st} − CE" for st in STUDENTS) + " | cost / CE |",
                  "|---|" + "---|" * (2 * len(STUDENTS) + 1)]
        group = None
        for name in res["methods"]:
            if groups[name] != group:
                group = groups[name]
                lines.append(f"| *{group}* |" + " |" * (2 * len(STUDENTS) + 1))
            row = res["table"][name]
            diffs = " | ".join("—" if name == "ce" else _diff(row[st][f"minus_ce_{which}"]) for st in STUDENTS)
            cost = row["cost_vs_ce"]
            lines.append(f"| {labels[name]} | " + " | ".join(_pm(row[st][which]) for st in STUDENTS)
                         + f" | {diffs} | {cost['mean']:.2f} ± {cost['std']:.2f} |")
        lines.append("")
    exits = [m for m in res["methods"] if res["exits"][m]]
    if exits:
        lines += ["## Multi-exit students: final exit vs the ensemble of exits (test top-1)", "",
                  "| method | weights | " + " | ".join(f"{st} final" for st in STUDENTS) + " | "
                  + " | ".join(f"{st} ensemble" for st in STUDENTS) + " | "
                  + " | ".join(f"{st} ensemble − CE" for st in STUDENTS) + " |",
                  "|---|---|" + "---|" * (3 * len(STUDENTS))]
        for name in exits:
            row = res["table"][name]
            for which in ("last", "best_on_val"):
                lines.append(f"| {labels[name]} | {which.replace('_', '-')} | "
                             + " | ".join(_pm(row[st][which]) for st in STUDENTS) + " | "
                             + " | ".join(_pm(row[st][f"{which}_ensemble"]) for st in STUDENTS) + " | "
                             + " | ".join(_diff(row[st][f"minus_ce_{which}_ensemble"]) for st in STUDENTS) + " |")
        lines.append("")
    targets = res.get("metadistiller_targets")
    if targets:
        lines += [f"## MetaDistiller: the generated targets on the {targets['split']} split (end of training)", "",
                  f"Mean entropy of softmax(T_k / tau) (tau = {targets['temperature']:g}) over the {targets['split']} images "
                  f"against the uniform distribution's log K = {targets['log_k']:.3f} nats, and how often its top class is "
                  "the label (chance: 1/K); mean ± std over seeds, averaged over the early exits, then per exit.", "",
                  "| student | entropy (nats) | entropy / log K | agreement with labels (%) "
                  "| per exit: entropy / log K | per exit: agreement (%) |",
                  "|---|---|---|---|---|---|"]
        for st in STUDENTS:
            t = targets["students"][st]
            lines.append(f"| {st} | {_pm(t['entropy'])} | {_pm(t['entropy_over_log_k'])} | {_pm(t['label_agreement'])} | "
                         + " / ".join(f"{e['entropy_over_log_k']['mean']:.2f}" for e in t["per_exit"]) + " | "
                         + " / ".join(f"{e['label_agreement']['mean']:.1f}" for e in t["per_exit"]) + " |")
        lines.append("")
    lines += ["## Which methods beat CE (last epoch)", ""]
    for name in res["methods"]:
        if name == "ce":
            continue
        row = res["table"][name]
        parts = []
        for st in STUDENTS:
            d = row[st]["minus_ce_last"]
            p = d.get("p_two_sided")
            if d["kd_better"] == n and p is not None and p < 0.05:
                word = "above CE on every seed (p " + _p(p) + ")"
            elif d["ce_better"] == n and p is not None and p < 0.05:
                word = "below CE on every seed (p " + _p(p) + ")"
            elif d["mean"] > 0:
                word = f"not distinguishable from CE ({d['mean']:+.2f})"
            else:
                word = f"does not beat CE ({d['mean']:+.2f})"
            parts.append(f"{st} {word}")
        lines.append(f"- **{labels[name]}**: " + "; ".join(parts) + ".")
    lines += ["", f"Caveats: {n} seeds and one fixed {res['test_size']}-image test split; {len(res['methods'])} methods × "
              f"{len(STUDENTS)} students without multiple-comparison correction; every method file is used as written "
              "(hyper-parameters from the papers, nothing tuned on digits' test split). Timings come from one shared "
              "2-core machine, one thread per run, runs sequential." + (f" {s['note']}" if s.get("note") else ""), ""]
    for rerun in s.get("reruns", []):
        names = ", ".join(labels[m] for m in rerun["methods"])
        text = (f"Rows rerun on {rerun['date']} and merged into this table (`--merge`; the other rows unchanged): "
                f"{names}, seeds {', '.join(map(str, rerun['seeds']))}, each with a fresh CE run of the same seed")
        if rerun.get("ce_reproduced", True):
            text += " that reproduced the stored CE accuracies exactly; their cost is relative to those fresh CE runs."
        else:
            fresh, stored = rerun["fresh_ce"], res["table"]["ce"]
            means = lambda row: " / ".join(f"{statistics.fmean(row[st]['last']['per_seed']):.2f}" for st in STUDENTS)  # noqa: E731
            text += (f". **That CE did not reproduce the stored CE row** (last-epoch test top-1 {' / '.join(STUDENTS)}: "
                     f"fresh {means(fresh)}, stored {means(stored)}; teacher {rerun['fresh_teacher_test_top1']['mean']:.2f} "
                     f"vs {res['teacher_test_top1']['mean']:.2f}): the code or the machine differs from the other rows'. "
                     "These rows' − CE columns, verdicts and cost are against the fresh CE runs; their absolute "
                     "accuracies are not comparable with the other rows' (compare the − CE columns).")
        lines += [text + (f" {rerun['note']}" if rerun.get("note") else ""), ""]
    return "\n".join(lines) + "\n"


def _ce_drift(stored: dict[str, Any], fresh: dict[str, Any]) -> list[str]:
    """Where the fresh CE runs do not give exactly the stored CE accuracies (per seed and student)."""
    drift = []
    for student in STUDENTS:
        for which in ("last", "best_on_val"):
            old, new = stored[student][which]["per_seed"], fresh[student][which]["per_seed"]
            if old != new:
                drift.append(f"CE {student} {which} test top-1 per seed is {new} now but {old} in the stored table")
    return drift


def merge(stored: dict[str, Any], fresh: dict[str, Any], note: str, allow_ce_drift: bool = False) -> dict[str, Any]:
    """``stored`` with the rows of ``fresh``'s methods (except CE) replaced; records the rerun."""
    if fresh["settings"]["seeds"] != stored["settings"]["seeds"]:
        raise SystemExit(f"--merge: seeds {fresh['settings']['seeds']} differ from the stored table's "
                         f"{stored['settings']['seeds']}")
    for key in ("student_epochs", "teacher_epochs", "threads"):
        if fresh["settings"][key] != stored["settings"][key]:
            raise SystemExit(f"--merge: {key} {fresh['settings'][key]} differs from the stored table's {stored['settings'][key]}")
    drift = _ce_drift(stored["table"]["ce"], fresh["table"]["ce"])
    if drift and not allow_ce_drift:
        raise SystemExit("--merge: " + "; ".join(drift) + ". The code, data or machine differs from the stored rows': "
                         "rerun the whole table, or pass --allow-ce-drift to merge against the fresh CE runs.")
    out = copy.deepcopy(stored)
    rerun = [m for m in fresh["methods"] if m != "ce"]
    for m in rerun:
        if m not in out["methods"]:
            raise SystemExit(f"--merge: {m} is not a row of the stored table")
        out["table"][m] = fresh["table"][m]
        out["settings"]["method_files"][m] = fresh["settings"]["method_files"][m]
        for seed, runs in fresh["runs"].items():
            out["runs"][str(seed)][m] = runs[m]
    out["settings"].setdefault("reruns", []).append({
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "methods": rerun,
        "seeds": fresh["settings"]["seeds"],
        "note": note,
        "environment": fresh["environment"],
        "ce_reproduced": not drift,
        "ce_drift": drift,
        "fresh_ce": {st: {w: {"per_seed": fresh["table"]["ce"][st][w]["per_seed"]} for w in ("last", "best_on_val")}
                     for st in STUDENTS},
        "fresh_teacher_test_top1": fresh["teacher_test_top1"],
        "fresh_teacher_sha256": fresh["teacher_sha256"],
        "ce_train_s": fresh["table"]["ce"]["train_s"],
        "elapsed_s": fresh["elapsed_s"],
        "ce_runs": {str(seed): runs["ce"] for seed, runs in fresh["runs"].items()},
    })
    return out


def main(argv: list[str] | None = None) -> int:
    p = run_arguments(__doc__.split("\n\n")[0], "digits_collab", [0, 1, 2])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), help="a subset (ce is always run)")
    p.add_argument("--note", default="", help="a remark on the measurement, printed under the tables")
    p.add_argument("--merge", action="store_true",
                   help="rerun only --methods (and CE, which must reproduce its stored rows) with the stored table's seeds "
                        "and replace their rows in --out/digits_collab.json; the other rows stay as they are")
    p.add_argument("--allow-ce-drift", action="store_true",
                   help="with --merge: merge even if the fresh CE runs do not reproduce the stored CE row (the merged "
                        "rows are then paired with the fresh CE runs, and the Markdown says so)")
    args = p.parse_args(argv)
    args.runs_dir = args.runs_dir.resolve()
    stored = None
    if args.merge and not args.render_only:
        stored_file = args.out / "digits_collab.json"
        if not stored_file.is_file():
            p.error(f"--merge needs an existing {stored_file}")
        stored = json.loads(stored_file.read_text())
        if "--seeds" not in (argv if argv is not None else sys.argv[1:]):
            args.seeds = stored["settings"]["seeds"]
    if prepare_output(p, args, "digits_collab", markdown):
        return 0
    started = time.perf_counter()
    methods = {n: m for n, m in METHODS.items() if n == "ce" or n in args.methods}
    per_seed: dict[int, dict[str, Any]] = {}
    runs: dict[int, dict[str, Any]] = {}
    hashes: dict[int, str] = {}
    for seed in args.seeds:
        print(f"seed {seed}", flush=True)
        per_seed[seed], runs[seed], hashes[seed] = _run_seed(seed, methods, args)
        for n in methods:
            print(f"  {n}: " + ", ".join(f"{st} {per_seed[seed][n]['students'][st]['last']['test_top1']:.2f}" for st in STUDENTS),
                  flush=True)
    seeds = sorted(per_seed)
    from collab_distill.tasks.classification import Digits

    sizes = Digits(meta_fraction=0.1, val_fraction=0.1).setup(seeds[0]).extra["split_sizes"]
    first = per_seed[seeds[0]]["ce"]
    res = {
        "environment": {"platform": platform.platform(), "python": sys.version.split()[0], "cpu_count": os.cpu_count()},
        "settings": {"seeds": seeds, "student_epochs": first["epochs"], "threads": args.threads,
                     "teacher_epochs": args.teacher_epochs or 15, "config": str(CONFIG.relative_to(REPO)), "note": args.note,
                     "method_files": {n: [f"examples/methods/{m.file}.yaml"]
                                      + (["examples/methods/kdcl_views.yaml"] if m.views else [])
                                      for n, m in methods.items()}},
        "methods": list(methods),
        "labels": {n: m.label for n, m in methods.items()},
        "groups": {n: m.group for n, m in methods.items()},
        "exits": {n: m.exits for n, m in methods.items()},
        "test_size": sizes["test"], "val_size": sizes["val"], "meta_size": sizes.get("meta"),
        "teacher_test_top1": _summary([per_seed[s]["ce"]["teachers"]["teacher"]["test"]["top1"] for s in seeds]),
        "teacher_sha256": hashes,
        "table": collect(per_seed, methods),
        "metadistiller_targets": metadistiller_targets(runs),
        "runs": {s: {n: {"wall_s": r["wall_s"], "command": _portable(r["command"])} for n, r in v.items()}
                 for s, v in runs.items()},
        "elapsed_s": time.perf_counter() - started,
    }
    if stored is not None:
        # (through JSON: the stored seeds are strings)
        res = merge(stored, json.loads(json.dumps(res)), args.note, args.allow_ce_drift)
        if "metadistiller" in methods:  # the rerun MetaDistiller row's targets replace the stored ones
            res["metadistiller_targets"] = metadistiller_targets(runs)
    write_outputs(args.out, "digits_collab", res, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
