"""Diagnostic: does it matter *when* in a step the frozen teacher runs?

Since commit 48c7e91 the engine's teacher records are lazy: the teacher's forward pass runs on
first access, i.e. inside ``Engine.cohort_loss`` (when the soft-target hook reads it), after every
student's forward pass, while the students' autograd graphs are alive. The hand-written loop (and
the engine before that commit) runs the teacher first. This script times three variants of the
same KD step on the same batch, interleaved round-robin:

* ``engine``: ``Engine.training_step`` as it is;
* ``engine, teacher first``: the same engine object type, with its teacher records resolved
  before the students run (``Engine.teacher_records`` wrapped to read every record at once),
  which is what a fix would do whenever the teacher is going to be needed;
* ``hand``: the plain PyTorch loop of ``step_time.py``.

It also counts minor page faults per step: on CPU, glibc returns the freed teacher activations to
the OS when they sit on top of the heap, and the next step faults them back in.

    python benchmarks/teacher_order.py            # ~3 minutes on 2 CPU cores
    python benchmarks/teacher_order.py --steps 10 --out benchmarks/out/teacher_order
    MALLOC_TRIM_THRESHOLD_=4000000000 MALLOC_MMAP_THRESHOLD_=4000000000 \
        python benchmarks/teacher_order.py --name teacher_order_malloc   # glibc keeps freed memory

Writes ``teacher_order.{json,md}`` to ``--out`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import step_time as st  # noqa: E402


def teacher_first(engine) -> None:
    """Make ``engine`` resolve its (lazy) teacher records before the students' forward passes."""
    lazy = engine.teacher_records

    def eager(self, batch, context=None):
        records = lazy(batch, context)
        for _ in records.values():  # reading the values runs the teachers now
            pass
        return records

    engine.teacher_records = types.MethodType(eager, engine)


def measure(label: str, students: dict[str, str], teacher: str, data_factory, workdir: Path, steps: int,
            warmup: int) -> dict[str, Any]:
    engine, hand, batch = st.build_pair(data_factory, students, teacher, workdir)
    first, _, _ = st.build_pair(data_factory, students, teacher, workdir)
    teacher_first(first)
    x, y = batch["inputs"], batch["targets"]
    faults: dict[str, list[int]] = {}
    fns = {"engine": lambda: engine.training_step(batch), "engine, teacher first": lambda: first.training_step(batch),
           "hand": lambda: hand.step(x, y)}
    times = st.time_interleaved(fns, steps, warmup, rotate=True, faults=faults)
    hand_median = statistics.median(times["hand"])
    row = {"setup": label, "students": list(students.values()), "teacher": teacher, "input_shape": list(x.shape),
           "variants": {n: {**st._stats(t), "vs_hand": statistics.median(t) / hand_median,
                            "minor_page_faults_per_step": statistics.median(faults[n])} for n, t in times.items()}}
    print(f"[{label}] " + ", ".join(f"{n} {v['median']*1e3:.1f} ms "
                                    f"({v['vs_hand']:.3f}x hand, {v['minor_page_faults_per_step']:.0f} faults)"
                                    for n, v in row["variants"].items()), flush=True)
    return row


def markdown(res: dict[str, Any]) -> str:
    malloc = ", ".join(f"{k}={v}" for k, v in res["environment"].get("malloc_env", {}).items())
    lines = [
        "# When does the teacher run? (diagnostic)",
        "",
        f"torch {res['environment']['torch']}, {res['environment']['cpu_count']} CPU cores, "
        f"threads={res['environment']['threads']}, "
        f"glibc malloc tuning: {malloc or 'none (defaults)'}; "
        f"{res['settings']['steps']} timed steps per variant, interleaved round-robin; median (IQR) ms per KD step "
        "(alpha 0.3, beta 0.7, tau 4), input 128x3x32x32 (CIFAR-100-shaped), teacher ResNet(l).",
        "",
        "| students | engine ms | engine, teacher first ms | hand ms | engine / hand | teacher first / hand "
        "| page faults/step engine / teacher first / hand |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        v = r["variants"]
        e, f, h = v["engine"], v["engine, teacher first"], v["hand"]
        lines.append(f"| {', '.join(r['students'])} | {st._ms(e)} | {st._ms(f)} | {st._ms(h)} | **{e['vs_hand']:.3f}** "
                     f"| {f['vs_hand']:.3f} | {e['minor_page_faults_per_step']/1e3:.1f}k "
                     f"/ {f['minor_page_faults_per_step']/1e3:.1f}k "
                     f"/ {h['minor_page_faults_per_step']/1e3:.1f}k |")
    lines += ["", "If `engine / hand` is above `teacher first / hand`, running the teacher after the students costs time; "
              "once the engine resolves the teacher first the two columns should agree.", ""]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=st.HERE / "results")
    p.add_argument("--name", default="teacher_order", help="stem of the result files")
    p.add_argument("--render-only", action="store_true", help="only rewrite the .md from the .json")
    args = p.parse_args(argv)
    if args.render_only:
        res = json.loads((args.out / f"{args.name}.json").read_text())
        (args.out / f"{args.name}.md").write_text(markdown(res))
        return 0
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    cifar = lambda: st.SyntheticCIFAR(batch_size=128)  # noqa: E731
    rows = []
    with tempfile.TemporaryDirectory(prefix="teacher_order_") as tmp:
        work = Path(tmp)
        rows.append(measure("xxs,xs,s,m", {"xxs": "xxs", "xs": "xs", "s": "s", "m": "m"}, "l", cifar, work,
                            args.steps, args.warmup))
        for k in (1, 3, 5):
            rows.append(measure(f"{k} x s", {f"s_{i}": "s" for i in range(k)}, "l", cifar, work, args.steps, args.warmup))
    res = {"environment": {"torch": torch.__version__, "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
                           "loadavg": " ".join(f"{v:.2f}" for v in os.getloadavg()),
                           "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}},
           "settings": {"steps": args.steps, "warmup": args.warmup}, "rows": rows, "elapsed_s": time.perf_counter() - started}
    (args.out / f"{args.name}.json").write_text(json.dumps(res, indent=1) + "\n")
    (args.out / f"{args.name}.md").write_text(markdown(res))
    print(f"wrote {args.out}/{args.name}.{{json,md}} in {res['elapsed_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
