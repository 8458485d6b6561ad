"""The tiny detection cohort through both adapters (torchvision and detectron2): step times,
the meta step's cost, and COCO AP of each student distilled vs. trained alone.

* ``steps``: in-process, one thread, one fixed training batch of the shapes data; the real
  engine's ``training_step`` timed interleaved (after warm-up) for KD (FixedLossWeights 1/0.5)
  and MC-Distil (C-Net + PooledStudent) with the meta step forced off and forced on
  (finite-difference hypergradient, the one that runs through roi_align).
* ``ap``: CLI runs of ``examples/coco_tiny.yaml`` and ``examples/coco_tiny_detectron2.yaml``,
  one seed: KD (which trains the teacher first), then the students alone (``methods/ce.yaml``)
  and MC-Distil from that teacher; test AP at the last epoch and at the best val epoch.
  Runs that already finished are reused (delete ``benchmarks/out/detection_tiny`` to redo).

    python -m collab_distill.tasks.detection.shapes data/shapes
    python benchmarks/detection_tiny.py            # writes benchmarks/results/detection_tiny.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from step_time import time_interleaved  # noqa: E402

ADAPTERS = {"torchvision": REPO / "examples" / "coco_tiny.yaml", "detectron2": REPO / "examples" / "coco_tiny_detectron2.yaml"}
METHODS = {"kd": [], "alone": ["--config", str(REPO / "examples" / "methods" / "ce.yaml")],
           "mc_distil": ["--config", str(REPO / "examples" / "methods" / "mc_distil.yaml")]}


def bench_steps(adapter: str, data: Path, workdir: Path, steps: int, warmup: int) -> dict[str, Any]:
    from collab_distill.cli import engine_from_args

    base = ["--config", str(ADAPTERS[adapter]), "--task.init_args.data.init_args.root", str(data),
            "--trainer.root_dir", str(workdir), "--trainer.progress_bar", "false", "--trainer.loggers", "[]"]
    engines = {"kd": engine_from_args(base),
               "mc_distil": engine_from_args([*base, *METHODS["mc_distil"], "--meta.hypergradient", "finite_difference"])}
    fns = {}
    for name, engine in engines.items():
        engine.setup()
        engine.prepare_training()  # the teacher keeps its initial weights: timing only
        loader, sampler = engine.loaders["train"]
        sampler.select_epoch(0)
        batch = engine.task.move_batch(next(iter(loader)), engine.fabric)

        def step(engine=engine, batch=batch, meta=False):
            engine.meta_step_due = lambda: meta  # type: ignore[method-assign]
            return engine.training_step(batch)

        if name == "kd":
            fns["kd"] = step
        else:
            fns["mc_distil"] = step
            fns["mc_distil_meta_step"] = lambda step=step: step(meta=True)
    times = time_interleaved(fns, steps=steps, warmup=warmup, rotate=True)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    paired = [m / p for m, p in zip(times["mc_distil_meta_step"], times["mc_distil"])]
    return {"adapter": adapter, "steps": steps, "batch_size": engines["kd"].task.data.batch_size,
            "kd_ms": med["kd"], "mc_distil_ms": med["mc_distil"], "mc_distil_meta_step_ms": med["mc_distil_meta_step"],
            "meta_ratio": med["mc_distil_meta_step"] / med["mc_distil"], "meta_ratio_paired_median": statistics.median(paired),
            "mc_distil_vs_kd": med["mc_distil"] / med["kd"]}


def run_ap(adapter: str, data: Path, out: Path, epochs: int, seed: int, env: dict[str, str]) -> dict[str, Any]:
    runs = {}
    teacher = out / adapter / "kd" / "version_0" / "teachers" / "teacher" / "teacher.pt"
    for method, extra in METHODS.items():
        run = out / adapter / method / "version_0"
        if not (run / "results.json").is_file() or json.loads((run / "results.json").read_text()).get("status") != "finished":
            args = [sys.executable, "-m", "collab_distill", "fit", "--config", str(ADAPTERS[adapter]), *extra,
                    "--task.init_args.data.init_args.root", str(data), "--trainer.root_dir", str(out / adapter),
                    "--trainer.name", method, "--trainer.max_epochs", str(epochs), "--seed", str(seed),
                    "--trainer.progress_bar", "false"]
            if method != "kd":
                args += ["--cohort.teachers.teacher.checkpoint", str(teacher), "--cohort.teachers.teacher.train_epochs", "0"]
            print(" ".join(args[1:]), flush=True)
            subprocess.run(args, check=True, env=env, cwd=REPO)
        results = json.loads((run / "results.json").read_text())
        runs[method] = {
            "students": {name: {"last_test_AP": r["last"]["test_AP"], "last_test_AP50": r["last"]["test_AP50"],
                                "best_val_test_AP": r["best_on_val"]["test_AP"], "best_epoch": r["best_on_val"].get("epoch")}
                         for name, r in results["students"].items()},
            "teacher_test_AP": next((r["test"]["AP"] for r in results.get("teachers", {}).values() if "test" in r), None),
            "epoch_seconds_median": statistics.median(h["seconds"] for h in results["history"]),
        }
    return runs


def markdown(report: dict[str, Any]) -> str:
    lines = ["# Tiny detection cohort: both adapters", ""]
    if report.get("steps"):
        lines += [f"Training step, median of {report['steps'][0]['steps']} interleaved steps, {report['threads']} thread(s), "
                  "batch of 4 shapes images (128 px), CPU. MC-Distil's meta step: finite-difference hypergradient.", "",
                  "| adapter | KD step ms | MC-Distil step ms (no meta) | MC-Distil step with meta ms "
                  "| meta / plain (paired median) | MC-Distil / KD |",
                  "|---|---|---|---|---|---|"]
        for r in report["steps"]:
            lines.append(f"| {r['adapter']} | {r['kd_ms']:.0f} | {r['mc_distil_ms']:.0f} | {r['mc_distil_meta_step_ms']:.0f} | "
                         f"{r['meta_ratio']:.2f} ({r['meta_ratio_paired_median']:.2f}) | {r['mc_distil_vs_kd']:.2f} |")
        lines.append("")
    for adapter, runs in sorted(report.get("ap", {}).items(), reverse=True):
        lines += [f"## {adapter}: COCO box AP on the shapes test split ({report['epochs']} epochs, seed {report['seed']})", "",
                  "| student | alone (CE) last | KD last | MC-Distil last | alone best-val | KD best-val | MC-Distil best-val |",
                  "|---|---|---|---|---|---|---|"]
        for name in runs["kd"]["students"]:
            cells = [f"{runs[m]['students'][name]['last_test_AP']:.1f}" for m in ("alone", "kd", "mc_distil")]
            cells += [f"{runs[m]['students'][name]['best_val_test_AP']:.1f}" for m in ("alone", "kd", "mc_distil")]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        teacher = runs["kd"].get("teacher_test_AP")
        if teacher is not None:
            lines.append(f"\nTeacher (trained in the KD run): test AP {teacher:.1f}.")
        lines.append("Median epoch seconds, students only, 1 thread (these runs overlapped other jobs; the step table "
                     "above is the cost measurement): " + ", ".join(
            f"{m} {runs[m]['epoch_seconds_median']:.0f}" for m in ("alone", "kd", "mc_distil")) + ".")
        lines.append("")
    lines.append("One seed on a synthetic data set: differences of a few AP points are within run-to-run noise.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", nargs="+", default=["steps", "ap"], choices=["steps", "ap"])
    p.add_argument("--adapters", nargs="+", default=list(ADAPTERS), choices=list(ADAPTERS))
    p.add_argument("--data", type=Path, default=REPO / "data" / "shapes")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--runs", type=Path, default=HERE / "out" / "detection_tiny")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not (args.data / "annotations" / "instances_train2017.json").is_file():
        p.error(f"{args.data} has no shapes data; run: python -m collab_distill.tasks.detection.shapes {args.data}")
    path = args.out / "detection_tiny.json"
    report = json.loads(path.read_text()) if path.is_file() else {}
    report.update(threads=args.threads, epochs=args.epochs, seed=args.seed)
    if "steps" in args.parts:
        with tempfile.TemporaryDirectory() as tmp:
            rows = {r["adapter"]: r for r in report.get("steps", [])}
            for adapter in args.adapters:
                rows[adapter] = bench_steps(adapter, args.data, Path(tmp), args.steps, args.warmup)
                print(rows[adapter], flush=True)
            report["steps"] = list(rows.values())
    if "ap" in args.parts:
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        report.setdefault("ap", {})
        for adapter in args.adapters:
            report["ap"][adapter] = run_ap(adapter, args.data, args.runs, args.epochs, args.seed, env)
    args.out.mkdir(parents=True, exist_ok=True)
    # merge with what another invocation (other adapters or parts) wrote meanwhile
    latest = json.loads(path.read_text()) if path.is_file() else {}
    steps = {r["adapter"]: r for r in latest.get("steps", [])}
    steps.update({r["adapter"]: r for r in report.get("steps", [])})
    report = {**latest, **report, "steps": list(steps.values()), "ap": {**latest.get("ap", {}), **report.get("ap", {})}}
    path.write_text(json.dumps(report, indent=1) + "\n")
    (args.out / "detection_tiny.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
