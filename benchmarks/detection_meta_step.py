"""The detection meta step: how close the finite-difference hypergradient is to the exact one,
and what MC-Distil costs against KD, on both adapters (``benchmarks/configs/detection_*.yaml``).

* **hypergradient**: the real engine with ``examples/methods/mc_distil_detection.yaml``, after a
  few training steps with meta steps (so every C-Net layer has moved off its initialisation); on
  several (training batch, meta batch) pairs, the C-Net's hypergradient by ``second_order`` (the
  exact one: a lookahead through the detectors with the twice-differentiable RoIAlign) and by
  ``finite_difference`` at two epsilons; their cosine and norm ratio, and the time of each.
* **cost**: one process, one thread, steps interleaved after warm-up on fixed batches: a KD step
  (the config's FixedLossWeights), an MC-Distil step without and with a meta step (each
  hypergradient). MC-Distil / KD per epoch = ``((n - 1) * plain + meta) / (n * kd)`` for a meta
  step every ``n`` steps (the method file's, and 5).

The teacher is the benchmark's trained one when ``benchmarks/out/detection/<adapter>/clean/teacher``
exists (``benchmarks/detection.py`` trains it), else randomly initialised (cost is the same).

    python benchmarks/detection_meta_step.py            # writes benchmarks/results/detection_meta_step.{json,md}
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from detection import ADAPTERS, MC_DISTIL, _finished  # noqa: E402
from step_time import time_interleaved  # noqa: E402


def _engine(adapter: str, data: Path, workdir: Path, *extra: str) -> Any:
    from collab_distill.cli import engine_from_args

    teacher_run = _finished(HERE / "out" / "detection" / adapter / "clean" / "teacher")
    args = ["--config", str(ADAPTERS[adapter]["config"]), "--task.init_args.data.init_args.root", str(data),
            "--trainer.root_dir", str(workdir), "--trainer.progress_bar", "false", "--trainer.loggers", "[]"]
    if teacher_run is not None:
        args += ["--cohort.teachers.teacher.checkpoint", str(teacher_run / "checkpoints" / "last.ckpt"),
                 "--cohort.teachers.teacher.train_epochs", "0"]  # a checkpoint and train_epochs exclude each other
    else:
        args += ["--cohort.teachers.teacher.train_epochs", "1"]  # not trained: ready_training() skips it
    engine = engine_from_args([*args, *extra])
    engine.build()
    engine.ready_training()
    return engine, teacher_run is not None


def _batches(engine: Any, count: int, split: str = "train") -> list[Any]:
    loader, sampler = engine.loaders[split]
    if hasattr(sampler, "select_epoch"):
        sampler.select_epoch(0)
    out = []
    for batch in loader:
        out.append(engine.task.move_batch(batch, engine.fabric))
        if len(out) == count:
            break
    return out


def hypergradients(adapter: str, data: Path, workdir: Path, pairs: int, warm_steps: int) -> dict[str, Any]:
    engine, trained = _engine(adapter, data, workdir, "--config", str(MC_DISTIL), "--trainer.warmup_epochs", "0")
    train = _batches(engine, warm_steps + pairs)
    meta = _batches(engine, pairs, "meta")
    for i, batch in enumerate(train[:warm_steps]):  # move the C-Net off its zero-initialised head
        engine.meta_step_due = lambda i=i: i % 2 == 0  # type: ignore[method-assign]
        engine.training_step(batch)
        engine.loop.global_step += 1
    rows = []
    for batch, meta_batch in zip(train[warm_steps:], meta):
        context = engine.task.shared_context(batch, engine.teachers, engine.students)
        teachers = engine.teacher_records(batch, context)
        grads, seconds = {}, {}
        for name, kind, eps in (("exact", "second_order", None), ("fd_0.01", "finite_difference", 0.01),
                                ("fd_0.001", "finite_difference", 0.001)):
            engine.meta_config.hypergradient = kind
            if eps is not None:
                engine.meta_config.fd_epsilon = eps
            start = time.perf_counter()
            _, g, _ = engine.bilevel.gradients(engine.fabric, batch, teachers, context, meta_batch=meta_batch)
            seconds[name] = time.perf_counter() - start
            grads[name] = torch.cat([x.flatten() for x in g]).double()
        exact = grads["exact"]
        row = {"exact_norm": float(exact.norm()), "seconds": seconds}
        for name in ("fd_0.01", "fd_0.001"):
            row[f"cosine_{name}"] = float(torch.nn.functional.cosine_similarity(grads[name], exact, dim=0))
            row[f"norm_ratio_{name}"] = float(grads[name].norm() / exact.norm().clamp_min(1e-30))
        rows.append(row)
        print(adapter, row, flush=True)
    return {"adapter": adapter, "trained_teacher": trained, "pairs": rows,
            "cosine_fd_0.01_median": statistics.median(r["cosine_fd_0.01"] for r in rows),
            "cosine_fd_0.001_median": statistics.median(r["cosine_fd_0.001"] for r in rows)}


def cost(adapter: str, data: Path, workdir: Path, steps: int, warmup: int) -> dict[str, Any]:
    kd, _ = _engine(adapter, data, workdir)
    fd, _ = _engine(adapter, data, workdir, "--config", str(MC_DISTIL), "--trainer.warmup_epochs", "0",
                    "--meta.hypergradient", "finite_difference")
    so, _ = _engine(adapter, data, workdir, "--config", str(MC_DISTIL), "--trainer.warmup_epochs", "0",
                    "--meta.hypergradient", "second_order")
    batch = {name: _batches(engine, 1)[0] for name, engine in (("kd", kd), ("fd", fd), ("so", so))}

    def step(engine: Any, b: Any, meta: bool) -> Any:
        engine.meta_step_due = lambda: meta  # type: ignore[method-assign]
        return engine.training_step(b)

    fns = {"kd": lambda: step(kd, batch["kd"], False), "mc_distil": lambda: step(fd, batch["fd"], False),
           "mc_distil_meta_fd": lambda: step(fd, batch["fd"], True), "mc_distil_meta_exact": lambda: step(so, batch["so"], True)}
    times = time_interleaved(fns, steps=steps, warmup=warmup, rotate=True)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    every = int(fd.meta_config.every_n_steps)
    out: dict[str, Any] = {"adapter": adapter, "steps": steps, "ms": med, "every_n_steps": every}
    for n in sorted({every, 5}):
        for kind in ("fd", "exact"):
            out[f"epoch_ratio_every{n}_{kind}"] = ((n - 1) * med["mc_distil"] + med[f"mc_distil_meta_{kind}"]) / (n * med["kd"])
    return out


def markdown(report: dict[str, Any]) -> str:
    lines = ["# Detection meta step: exact vs finite-difference hypergradient, and cost", "",
             f"One process, {report['threads']} thread(s), CPU; `benchmarks/configs/detection_<adapter>.yaml` with "
             "`examples/methods/mc_distil_detection.yaml`.", ""]
    if report.get("hypergradient"):
        lines += ["## How close is the finite-difference hypergradient?", "",
                  "Cosine between the C-Net's hypergradient by finite differences and the exact one (second order, "
                  "through the twice-differentiable RoIAlign), per (training batch, meta batch) pair after a few "
                  "training steps; norm ratio FD / exact; seconds per meta gradient.", "",
                  "| adapter | teacher | pair | cosine (eps 0.01) | norm ratio | cosine (eps 0.001) | norm ratio "
                  "| s exact | s FD |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in report["hypergradient"]:
            for i, p in enumerate(r["pairs"]):
                lines.append(f"| {r['adapter']} | {'trained' if r['trained_teacher'] else 'random'} | {i} | "
                             f"{p['cosine_fd_0.01']:.4f} | {p['norm_ratio_fd_0.01']:.3f} | {p['cosine_fd_0.001']:.4f} | "
                             f"{p['norm_ratio_fd_0.001']:.3f} | {p['seconds']['exact']:.2f} | {p['seconds']['fd_0.01']:.2f} |")
        lines.append("")
    if report.get("cost"):
        lines += ["## Cost: MC-Distil against KD", "",
                  f"Median ms per training step of {report['cost'][0]['steps']} interleaved steps on one fixed batch; "
                  "epoch ratio = ((n − 1) × MC-Distil step + step with a meta step) / (n × KD step).", "",
                  "| adapter | KD | MC-Distil, no meta | + meta (FD) | + meta (exact) | epoch ratio, FD | epoch ratio, exact |",
                  "|---|---|---|---|---|---|---|"]
        for r in report["cost"]:
            ms = r["ms"]

            def ratios(kind: str, r: dict[str, Any] = r) -> str:
                return ", ".join(f"every {n}: {r[f'epoch_ratio_every{n}_{kind}']:.2f}" for n in sorted({r["every_n_steps"], 5}))

            lines.append(f"| {r['adapter']} | {ms['kd']:.0f} | {ms['mc_distil']:.0f} | {ms['mc_distil_meta_fd']:.0f} | "
                         f"{ms['mc_distil_meta_exact']:.0f} | {ratios('fd')} | {ratios('exact')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--adapters", nargs="+", default=list(ADAPTERS), choices=list(ADAPTERS))
    p.add_argument("--parts", nargs="+", default=["hypergradient", "cost"], choices=["hypergradient", "cost"])
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--warm-steps", type=int, default=6)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data", type=Path, default=REPO / "data" / "shapes_bench")
    p.add_argument("--out", type=Path, default=HERE / "results")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    import tempfile

    report: dict[str, Any] = {"threads": args.threads, "hypergradient": [], "cost": []}
    with tempfile.TemporaryDirectory() as tmp:
        for adapter in args.adapters:
            if "hypergradient" in args.parts:
                report["hypergradient"].append(hypergradients(adapter, args.data, Path(tmp), args.pairs, args.warm_steps))
            if "cost" in args.parts:
                report["cost"].append(cost(adapter, args.data, Path(tmp), args.steps, args.warmup))
                print(report["cost"][-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "detection_meta_step.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / "detection_meta_step.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
