"""Feature-level and decoupled distillation on digits against their baselines: FitNets hints,
attention transfer and DKD against KD; Self-Distillation with its feature-hint term against SD
without it.

Every run is the real command line (``collab-distill fit --config examples/digits.yaml --config
examples/methods/<method>.yaml``), the method files as they are (nothing tuned here, nothing
selected on test). For every seed the CE run trains the teacher and stores it; KD, FitNets,
attention transfer and DKD load exactly that file, so the runs of one seed share the teacher, the
students' initial weights, the splits, the data order and the augmentation. SD and SD + hint
have no teacher (multi-exit students; the final exit is reported).

Reported (``digits_features.{json,md}``): per method and student, test top-1 mean ± std over
seeds, last epoch and best-on-val; the paired per-seed difference to the baseline (KD, or SD for
SD + hint) with a two-sided paired t-test; and the cost: student-training seconds (sum of epochs)
divided by the baseline's, per seed, mean ± std.

Usage::

    python benchmarks/digits_features.py                    # seeds 0-4, the config's 15 epochs
    python benchmarks/digits_features.py --seeds 0 1 --epochs 2 --out benchmarks/out/features_quick
    python benchmarks/digits_features.py --reuse            # pick up finished runs in --runs-dir
    python benchmarks/digits_features.py --render-only      # rewrite the .md from the .json
"""

from __future__ import annotations

import copy
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from digits_collab import METHOD_DIR, train_seconds  # noqa: E402
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

#: method -> (label, baseline, needs the teacher)
METHODS: dict[str, tuple[str, str | None, bool]] = {
    "kd": ("KD", None, True),
    "fitnets": ("FitNets hints + KD", "kd", True),
    "attention": ("Attention transfer + KD", "kd", True),
    "dkd": ("DKD", "kd", True),
    "sd": ("SD (logits)", None, False),
    "sd_hint": ("SD + feature hint", "sd", False),
}


def run_seed(seed: int, args: Any) -> tuple[dict[str, Any], dict[str, Any], str]:
    done = {"ce": run_one("ce", METHOD_DIR / "ce.yaml", seed, args, teacher=None)}
    teacher = done["ce"]["run_dir"] / "teachers" / "teacher" / "teacher.pt"
    if not teacher.is_file():
        raise SystemExit(f"the CE run of seed {seed} wrote no {teacher}")
    online = copy.copy(args)
    online.teacher_epochs = None
    for name, (_, _, needs_teacher) in METHODS.items():
        file = METHOD_DIR / f"{name}.yaml"
        done[name] = (run_one(name, file, seed, args, teacher=teacher) if needs_teacher
                      else run_one(name, file, seed, online, teacher=None))
    results = {n: json.loads((r["run_dir"] / "results.json").read_text()) for n, r in done.items()}
    return results, done, _sha256(teacher)


def collect(per_seed: dict[int, dict[str, Any]]) -> dict[str, Any]:
    seeds = sorted(per_seed)
    table: dict[str, Any] = {}
    for name, (_, baseline, _) in METHODS.items():
        row: dict[str, Any] = {}
        for student in STUDENTS:
            cell: dict[str, Any] = {}
            for which in ("last", "best_on_val"):
                acc = [per_seed[s][name]["students"][student][which]["test_top1"] for s in seeds]
                cell[which] = {**_summary(acc), "per_seed": acc}
                if baseline is not None:
                    base = [per_seed[s][baseline]["students"][student][which]["test_top1"] for s in seeds]
                    cell[f"minus_baseline_{which}"] = _paired([a - b for a, b in zip(acc, base)])
            row[student] = cell
        if baseline is not None:
            row["cost_vs_baseline"] = _summary([train_seconds(per_seed[s][name]) / train_seconds(per_seed[s][baseline])
                                                for s in seeds])
        row["train_s"] = _summary([train_seconds(per_seed[s][name]) for s in seeds])
        table[name] = row
    return table


def _diff(d: dict[str, Any]) -> str:
    return f"{d['mean']:+.2f} ({d['kd_better']}↑ {d['ce_better']}↓, p {_p(d.get('p_two_sided'))})"


def markdown(res: dict[str, Any]) -> str:
    s = res["settings"]
    n = len(s["seeds"])
    lines = [
        "# Feature-level and decoupled distillation on digits",
        "",
        f"Seeds {s['seeds']} ({n} runs per method, paired), {s['student_epochs']} student epochs, teacher "
        f"ResNet10-m trained with CE for {s['teacher_epochs']} epochs in each seed's CE run (test top-1 "
        f"{_pm(res['teacher_test_top1'])}); test split {res['test_size']} images. Test top-1 %, mean ± std over seeds; "
        "\"− base\" is the paired per-seed difference to the baseline (KD for the teacher methods, SD for SD + hint): "
        "mean (seeds better↑ worse↓, two-sided paired t-test p). Cost: student-training seconds / the baseline's.",
        "",
    ]
    for which, title in (("last", "last epoch"), ("best_on_val", "best on val")):
        lines += [f"## Test top-1, {title}", "",
                  "| method | " + " | ".join(f"{st} | − base" for st in STUDENTS) + " | cost |",
                  "|---|" + "---|---|" * len(STUDENTS) + "---|"]
        for name, (label, baseline, _) in METHODS.items():
            row = res["table"][name]
            cells = []
            for st in STUDENTS:
                cell = row[st]
                cells += [_pm(cell[which]), _diff(cell[f"minus_baseline_{which}"]) if baseline else "—"]
            cost = f"{row['cost_vs_baseline']['mean']:.2f} ± {row['cost_vs_baseline']['std']:.2f}×" if baseline else "1×"
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {cost} |")
        lines.append("")
    lines += ["Method files: " + ", ".join(f"`examples/methods/{m}.yaml`" for m in METHODS) + ".",
              f"Total wall time {res['elapsed_s'] / 60:.1f} min on {res['environment']['cpu_count']} CPU cores, "
              f"{s['threads']} thread(s) per run. {s.get('note', '')}".rstrip(), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = run_arguments(__doc__.split("\n\n")[0], "digits_features", [0, 1, 2, 3, 4])
    p.add_argument("--note", default="", help="a remark on the measurement, printed under the tables")
    args = p.parse_args(argv)
    args.runs_dir = args.runs_dir.resolve()
    if prepare_output(p, args, "digits_features", markdown):
        return 0
    started = time.perf_counter()
    per_seed: dict[int, dict[str, Any]] = {}
    runs: dict[int, dict[str, Any]] = {}
    hashes: dict[int, str] = {}
    for seed in args.seeds:
        print(f"seed {seed}", flush=True)
        per_seed[seed], runs[seed], hashes[seed] = run_seed(seed, args)
        for n in ["ce", *METHODS]:
            print(f"  {n}: " + ", ".join(f"{st} {per_seed[seed][n]['students'][st]['last']['test_top1']:.2f}"
                                         for st in STUDENTS), flush=True)
    seeds = sorted(per_seed)
    from collab_distill.tasks.classification import Digits

    sizes = Digits(meta_fraction=0.1, val_fraction=0.1).setup(seeds[0]).extra["split_sizes"]
    res = {
        "environment": {"platform": platform.platform(), "python": sys.version.split()[0], "cpu_count": os.cpu_count()},
        "settings": {"seeds": seeds, "student_epochs": per_seed[seeds[0]]["kd"]["epochs"], "threads": args.threads,
                     "teacher_epochs": args.teacher_epochs or 15, "config": str(CONFIG.relative_to(REPO)), "note": args.note},
        "methods": {n: {"label": m[0], "baseline": m[1], "file": f"examples/methods/{n}.yaml"} for n, m in METHODS.items()},
        "test_size": sizes["test"],
        "teacher_test_top1": _summary([per_seed[s]["ce"]["teachers"]["teacher"]["test"]["top1"] for s in seeds]),
        "teacher_sha256": hashes,
        "table": collect(per_seed),
        "runs": {s: {n: {"wall_s": r["wall_s"], "command": _portable(r["command"])} for n, r in v.items()}
                 for s, v in runs.items()},
        "elapsed_s": time.perf_counter() - started,
    }
    write_outputs(args.out, "digits_features", res, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
