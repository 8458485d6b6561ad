"""Should MC-Distil's one-step lookahead include the students' SGD momentum?

The students train with SGD momentum 0.9 (``examples/digits.yaml``), while ``meta.lookahead_momentum``
decides whether the bilevel step's lookahead ``theta' = theta - lr * (g + mu * buf)`` uses that
buffer or the plain gradient step ``theta - lr * g`` (MC-Distil's release includes the buffer
and weight decay in its lookahead). This script runs MC-Distil (``examples/methods/mc_distil.yaml``) both ways on digits,
paired by seed (same teacher, flips, initialisation, splits and data order), at noise rates 0 and
0.4 (instance-dependent flips on the training split only), through the real command line, and
reports per student val and test top-1 (last epoch and best-on-val weights), paired differences
and the C-Net's alpha AUC for clean vs flipped labels. The default is chosen on **val** (mean
last-epoch val top-1 over seeds, students and rates); test is reported, never used to choose.

    python benchmarks/lookahead_momentum.py --seeds 0 1 2 3 4 --jobs 2

Writes ``lookahead_momentum.{json,md}`` to ``--out`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from digits_noisy import noise_args  # noqa: E402
from digits_table import REPO, STUDENTS, _paired, _pm, _summary, run_one  # noqa: E402

METHODS = REPO / "examples" / "methods"
SETTINGS = {"plain": "false", "momentum": "true"}


def run_pair(rate: float, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    a = copy.copy(args)
    a.runs_dir = args.runs_dir / f"noise_{rate:g}"
    extra = (*noise_args(rate, "instance"), "--trainer.warmup_epochs", str(args.warmup))
    ce = run_one("ce", METHODS / "ce.yaml", seed, a, teacher=None, extra=extra)
    teacher = ce["run_dir"] / "teachers" / "teacher" / "teacher.pt"
    out: dict[str, Any] = {}
    for name, flag in SETTINGS.items():
        run = run_one(f"mc_{name}", METHODS / "mc_distil.yaml", seed, a, teacher,
                      (*extra, "--meta.lookahead_momentum", flag))
        results = json.loads((run["run_dir"] / "results.json").read_text())
        cnet = run["run_dir"] / "plugins" / "cnet" / "summary.json"
        summary = json.loads(cnet.read_text()) if cnet.is_file() else {}
        noise = (summary.get("train") or {}).get("label_noise") or {}
        out[name] = {
            **{f"{s}/{which}/{split}": results["students"][s][which][f"{split}_top1"]
               for s in STUDENTS for which in ("last", "best_on_val") for split in ("val", "test")
               if f"{split}_top1" in results["students"][s][which]},
            **{f"{s}/auc": noise[s]["alpha_auc_clean_vs_flipped"] for s in STUDENTS if s in noise},
            "meta_grad_norm": results.get("meta", {}).get("grad_norm_median"),
        }
    print(f"noise {rate:g} seed {seed}: " + "; ".join(
        f"{n} " + "/".join(f"{out[n][f'{s}/last/test']:.1f}" for s in STUDENTS) for n in SETTINGS), flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--noise", type=float, nargs="+", default=[0.0, 0.4])
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--teacher-epochs", type=int, default=None)
    p.add_argument("--reuse", action="store_true")
    p.add_argument("--runs-dir", type=Path, default=REPO / "benchmarks" / "out" / "lookahead_momentum")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = p.parse_args(argv)
    jobs = [(rate, seed) for rate in args.noise for seed in args.seeds]
    with ThreadPoolExecutor(args.jobs) as pool:
        done = dict(zip(jobs, pool.map(lambda job: run_pair(job[0], job[1], args), jobs)))
    rows: dict[str, Any] = {}
    for rate in args.noise:
        for key in [k for k in done[(rate, args.seeds[0])]["plain"] if "/" in k]:
            plain = [done[(rate, s)]["plain"][key] for s in args.seeds]
            mom = [done[(rate, s)]["momentum"][key] for s in args.seeds]
            rows[f"{rate:g}/{key}"] = {"plain": plain, "momentum": mom,
                                       "diff": _paired([m - q for m, q in zip(mom, plain)])}
    val = {name: [v for k, r in rows.items() if k.endswith("/last/val") for v in r[name]] for name in SETTINGS}
    chosen = max(SETTINGS, key=lambda n: sum(val[n]) / len(val[n]))
    result = {"seeds": args.seeds, "noise": args.noise, "warmup": args.warmup, "rows": rows,
              "val_mean": {n: sum(v) / len(v) for n, v in val.items()}, "chosen_on_val": chosen,
              "machine": f"{platform.platform()}, {args.jobs} runs at a time, OMP_NUM_THREADS={args.threads}",
              "runs": {f"{r:g}/{s}": v for (r, s), v in done.items()}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lookahead_momentum.json").write_text(json.dumps(result, indent=1))
    lines = [
        "# MC-Distil's lookahead: with or without the students' momentum",
        "",
        f"`benchmarks/lookahead_momentum.py`, `examples/digits.yaml` + `examples/methods/mc_distil.yaml` (students: SGD "
        f"momentum 0.9), seeds {', '.join(map(str, args.seeds))} paired, {args.warmup} CE warm-up epochs, instance-dependent "
        f"label noise on the training split only. {result['machine']}.",
        "",
        f"**Chosen on val** (mean last-epoch val top-1 over rates, seeds and students): plain "
        f"{result['val_mean']['plain']:.2f}, momentum {result['val_mean']['momentum']:.2f} -> "
        f"`lookahead_momentum: {SETTINGS[chosen]}`.",
        "",
        "| noise | student | weights | split | plain (lookahead_momentum: false) | momentum (true) | momentum − plain |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, r in rows.items():
        rate, rest = key.split("/", 1)
        parts = rest.split("/")
        if parts[-1] == "auc":
            desc = (parts[0], "alpha AUC clean vs flipped", "train")
        else:
            desc = (parts[0], parts[1].replace("_", "-"), parts[2])
        d = r["diff"]
        p = d.get("p_two_sided")
        cells = f"{_pm(_summary(r['plain']))} | {_pm(_summary(r['momentum']))}"
        paired = f"{d['mean']:+.2f} ({d['kd_better']}↑{d['ce_better']}↓" + (f", p = {p:.3f})" if p is not None else ")")
        lines.append(f"| {rate} | {desc[0]} | {desc[1]} | {desc[2]} | {cells} | {paired} |")
    (args.out / "lookahead_momentum.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
