"""How much MC-Distil's training step costs compared with KD's, with and without its meta step.

The real engine, in-process, on one fixed batch: KD's ``engine.training_step`` (FixedLossWeights
0.3/0.7) and MC-Distil's (C-Net + PooledStudent) with the meta step forced on and forced off, all
three interleaved (ABBA, one thread, after warm-up), for both hypergradients (exact
``second_order`` and ``finite_difference``) and two C-Nets: ``losses`` (examples/methods/mc_distil.yaml:
an MLP on the members' per-image losses) and ``image`` (mc_distil_image_only.yaml: ResNet10-s on
the image, the paper's g_phi(x)). Setups as ``step_time.py``: digits (xxs/xs/s students, ResNet-m
teacher, batch 64) and CIFAR-100-shaped data (xxs/xs/s/m students, ResNet-l teacher, batch 128).

With a meta step every ``n`` steps, MC-Distil's expected epoch time relative to KD's is
``(plain + (with_meta - plain) / n) / kd``.

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

from collab_distill.meta import BilevelConfig  # noqa: E402
from collab_distill.plugins.mc_distil import CNet, PooledStudent  # noqa: E402
from collab_distill.tasks.classification import Digits  # noqa: E402
from step_time import SyntheticCIFAR, make_engine, time_interleaved  # noqa: E402

SETUPS = {
    "digits": (lambda: Digits(batch_size=64), {"xxs": "xxs", "xs": "xs", "s": "s"}, "m"),
    "cifar-shaped": (lambda: SyntheticCIFAR(batch_size=128), {"xxs": "xxs", "xs": "xs", "s": "s", "m": "m"}, "l"),
}


C_NETS = {
    "losses": lambda: CNet(use_image=False, use_losses=True, hidden=32, mix=(0.3, 0.5, 0.2), lr=1e-2),
    "image": lambda: CNet(mix=(0.3, 0.5, 0.2)),
}


def bench(setup: str, hypergradient: str, c_net: str, workdir: Path, steps: int, warmup: int) -> dict:
    data, students, teacher = SETUPS[setup]
    engines = {
        "kd": make_engine(data(), students, teacher, workdir),
        "mc": make_engine(data(), students, teacher, workdir, plugins=[C_NETS[c_net](), PooledStudent()],
                          meta=BilevelConfig(every_n_steps=20, hypergradient=hypergradient)),
    }
    batches = {}
    for name, engine in engines.items():
        engine.ready_training()
        loader, sampler = engine.loaders["train"]
        sampler.select_epoch(0)
        batches[name] = engine.task.move_batch(next(iter(loader)), engine.fabric)

    def step(name: str, meta: bool):
        engine = engines[name]

        def run():
            engine.meta_step_due = lambda: meta  # type: ignore[method-assign]
            return engine.training_step(batches[name])
        return run

    times = time_interleaved({"kd": step("kd", False), "plain": step("mc", False), "with_meta": step("mc", True)},
                             steps=steps, warmup=warmup, rotate=True)
    kd, plain, meta = (statistics.median(times[k]) for k in ("kd", "plain", "with_meta"))
    paired = [m / p for m, p in zip(times["with_meta"], times["plain"])]
    return {"setup": setup, "hypergradient": hypergradient, "c_net": c_net, "kd_ms": kd * 1e3, "plain_ms": plain * 1e3,
            "with_meta_ms": meta * 1e3, "ratio": meta / plain, "paired_ratio_median": statistics.median(paired),
            "meta_step_ms": (meta - plain) * 1e3, "steps": steps,
            "expected_epoch_ratio_every_20": 1 + (meta / plain - 1) / 20,
            "expected_epoch_ratio_vs_kd_every_20": (plain + (meta - plain) / 20) / kd,
            "expected_epoch_ratio_vs_kd_every_5": (plain + (meta - plain) / 5) / kd}


def markdown(rows: list[dict], threads: int) -> str:
    lines = ["# Meta-step cost (MC-Distil: C-Net + PooledStudent) against KD", "",
             f"Median of {rows[0]['steps']} interleaved steps per variant (KD, MC-Distil without and with its meta step, "
             f"round-robin), {threads} thread(s). \"with meta\" is the training step that also runs the bilevel meta step "
             "(lookahead of every student, meta batch, C-Net update). C-Net `losses`: examples/methods/mc_distil.yaml's "
             "MLP on the per-image losses; `image`: the paper's ResNet10-s on the image.", "",
             "| setup | hypergradient | C-Net | KD step ms | MC-Distil step ms | step with meta ms | meta step alone ms | "
             "MC-Distil / KD, epoch at every 20 steps | at every 5 steps |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['setup']} | {r['hypergradient']} | {r['c_net']} | {r['kd_ms']:.1f} | {r['plain_ms']:.1f} | "
                     f"{r['with_meta_ms']:.1f} | {r['meta_step_ms']:.1f} | {r['expected_epoch_ratio_vs_kd_every_20']:.3f} | "
                     f"{r['expected_epoch_ratio_vs_kd_every_5']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--setups", nargs="+", default=list(SETUPS))
    p.add_argument("--c-nets", nargs="+", default=list(C_NETS))
    p.add_argument("--hypergradients", nargs="+", default=["second_order", "finite_difference"])
    p.add_argument("--out", type=Path, default=HERE / "results")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for setup in args.setups:
            for hypergradient in args.hypergradients:
                for c_net in args.c_nets:
                    rows.append(bench(setup, hypergradient, c_net, Path(tmp), args.steps, args.warmup))
                    print(rows[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "meta_step_time.json").write_text(json.dumps({"threads": args.threads, "rows": rows}, indent=1) + "\n")
    (args.out / "meta_step_time.md").write_text(markdown(rows, args.threads))
    print(markdown(rows, args.threads))
    return 0


if __name__ == "__main__":
    sys.exit(main())
