"""How much a training step with MC-Distil's bilevel meta step costs compared with one without.

The real engine, in-process, with the C-Net and PooledStudent plugins
(``examples/methods/mc_distil.yaml``'s settings) on one fixed batch: the same
``engine.training_step`` is timed with the meta step forced on and forced off (interleaved ABBA,
one thread, after warm-up), for both hypergradients (exact ``second_order`` and
``finite_difference``). Setups as ``step_time.py``: digits (xxs/xs/s students, ResNet-m teacher,
batch 64) and CIFAR-100-shaped data (xxs/xs/s/m students, ResNet-l teacher, batch 128).

With a meta step every ``n`` steps, the expected epoch-time ratio vs the same method without meta
steps is ``1 + (ratio - 1) / n``.

    python benchmarks/meta_step_time.py            # writes benchmarks/results/meta_step_time.{json,md}
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from step_time import SyntheticCIFAR, make_engine, time_interleaved  # noqa: E402

from collab_distill.meta import BilevelConfig  # noqa: E402
from collab_distill.plugins.mc_distil import CNet, PooledStudent  # noqa: E402
from collab_distill.tasks.classification import Digits  # noqa: E402

SETUPS = {
    "digits": (lambda: Digits(batch_size=64), {"xxs": "xxs", "xs": "xs", "s": "s"}, "m"),
    "cifar-shaped": (lambda: SyntheticCIFAR(batch_size=128), {"xxs": "xxs", "xs": "xs", "s": "s", "m": "m"}, "l"),
}


def bench(setup: str, hypergradient: str, workdir: Path, steps: int, warmup: int) -> dict:
    data, students, teacher = SETUPS[setup]
    engine = make_engine(data(), students, teacher, workdir, plugins=[CNet(), PooledStudent()],
                         meta=BilevelConfig(every_n_steps=20, hypergradient=hypergradient))
    engine._setup_training()
    loader, sampler = engine.loaders["train"]
    sampler.select_epoch(0)
    batch = engine.task.move_batch(next(iter(loader)), engine.fabric)

    def step(meta: bool):
        def run():
            engine._meta_step_due = lambda: meta  # type: ignore[method-assign]
            return engine.training_step(batch)
        return run

    times = time_interleaved({"plain": step(False), "with_meta": step(True)}, steps=steps, warmup=warmup)
    plain, meta = statistics.median(times["plain"]), statistics.median(times["with_meta"])
    paired = [m / p for m, p in zip(times["with_meta"], times["plain"])]
    return {"setup": setup, "hypergradient": hypergradient, "plain_ms": plain * 1e3, "with_meta_ms": meta * 1e3,
            "ratio": meta / plain, "paired_ratio_median": statistics.median(paired),
            "meta_step_ms": (meta - plain) * 1e3, "steps": steps,
            "expected_epoch_ratio_every_20": 1 + (meta / plain - 1) / 20}


def markdown(rows: list[dict], threads: int) -> str:
    lines = ["# Meta-step cost (MC-Distil: C-Net + PooledStudent)", "",
             f"Median of {rows[0]['steps']} interleaved steps per variant, {threads} thread(s). \"with meta\" is the "
             "training step that also runs the bilevel meta step (lookahead of every student, meta batch, C-Net update).", "",
             "| setup | hypergradient | plain step ms | step with meta ms | ratio (paired median) | meta step alone ms | "
             "expected epoch ratio at every_n_steps=20 |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['setup']} | {r['hypergradient']} | {r['plain_ms']:.1f} | {r['with_meta_ms']:.1f} | "
                     f"{r['ratio']:.2f} ({r['paired_ratio_median']:.2f}) | {r['meta_step_ms']:.1f} | {r['expected_epoch_ratio_every_20']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--setups", nargs="+", default=list(SETUPS))
    p.add_argument("--out", type=Path, default=HERE / "results")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for setup in args.setups:
            for hypergradient in ("second_order", "finite_difference"):
                rows.append(bench(setup, hypergradient, Path(tmp), args.steps, args.warmup))
                print(rows[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "meta_step_time.json").write_text(json.dumps({"threads": args.threads, "rows": rows}, indent=1) + "\n")
    (args.out / "meta_step_time.md").write_text(markdown(rows, args.threads))
    print(markdown(rows, args.threads))
    return 0


if __name__ == "__main__":
    sys.exit(main())
