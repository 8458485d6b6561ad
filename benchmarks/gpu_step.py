"""Training throughput of a KD and an MC-Distil cohort step per precision/compile/layout mode,
against a hand-written PyTorch loop on the same models, and the share of the step spent in the teacher.

For every setup (CIFAR-shaped classification; the tiny detection cohort of ``examples/coco_tiny.yaml``
at 128 px on synthetic shapes data) and mode (``fp32``, ``bf16``, ``bf16+compile``, ``fp32+channels_last``)
it builds, with the same weights and on one fixed batch already on the device:

* ``kd``: the real engine with ``FixedLossWeights(0.3, 0.7)``, timed through ``Engine.training_step``;
* ``mc_distil``: the real engine with ``CNet`` (losses MLP, as examples/methods/mc_distil.yaml) +
  ``PooledStudent`` and ``BilevelConfig(every_n_steps=5)``: the meta step runs on every 5th step
  (``engine.global_step`` is advanced after each step, ``engine.meta_step_due()`` decides);
* ``hand``: ``step_time.HandLoop`` (classification only) on deep copies of the KD engine's students and
  its teacher, under the same autocast / ``torch.compile`` / memory format. It is KD math only:
  it also serves as the baseline of the MC-Distil row, whose ratio therefore includes MC-Distil's
  own extra work (C-Net, PooledStudent target, meta step);
* ``teacher``: the teacher-only forward of the engine (``task.shared_context`` + the engine's
  teacher records, no grad, the run's autocast), i.e. what one step spends in the frozen teacher.

The four are timed round-robin (``step_time.time_interleaved``), each call followed by
``torch.cuda.synchronize()`` on CUDA, after warm-up steps (which include compilation and a first
meta step). Images/s = batch x timed steps / their summed time (the MC-Distil timed steps span whole
meta cycles); teacher share = median teacher-only forward / mean step time of that method.

    python benchmarks/gpu_step.py                       # CUDA: writes results/gpu_step.{json,md}
    python benchmarks/gpu_step.py --device cpu          # reduced CPU run: results/gpu_step_cpu.{json,md}
    python benchmarks/gpu_step.py --device cpu --setups cifar detection --compile-backend inductor
    python benchmarks/gpu_step.py --modes fp32 bf16 --steps 20 --warmup 10

CPU (default when there is no CUDA) is reduced: batch 32, students xxs/xs, teacher s, 5 timed
steps, compile backend ``aot_eager`` (``inductor`` takes minutes to compile on a small CPU) and the
CIFAR-shaped setup only: the detection step takes ~1 s (fp32) to ~5 s (bf16) on one core, so it is
opt-in there (``--setups cifar detection``, ~3 minutes per two modes). Under ``compile`` torchvision's
``roi_align`` recompiles for every box count until dynamo's recompile limit, then runs eager.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import collab_distill  # noqa: E402
import step_time as st  # noqa: E402
from collab_distill.meta import BilevelConfig  # noqa: E402
from collab_distill.plugins.mc_distil import CNet, PooledStudent  # noqa: E402

REPO = st.HERE.parent
MODES = {"fp32": {}, "bf16": {"precision": "bf16-mixed"}, "bf16+compile": {"precision": "bf16-mixed", "compile": True},
         "fp32+channels_last": {"channels_last": True}}
FULL = {"batch": 128, "students": ["xxs", "xs", "s", "m"], "teacher": "l", "steps": 30, "warmup": 10}
REDUCED = {"batch": 32, "students": ["xxs", "xs"], "teacher": "s", "steps": 5, "warmup": 5}


def trainer_fields(mode: str, device: str, backend: str) -> dict[str, Any]:
    m = MODES[mode]
    return {"accelerator": device, "precision": m.get("precision", "32-true"),
            "compile": backend if m.get("compile") else None, "channels_last": bool(m.get("channels_last"))}


@contextlib.contextmanager
def trainer_overrides(fields: dict[str, Any]):
    """``step_time.make_engine`` builds ``TrainerConfig(accelerator="cpu", ...)``: apply this mode's fields."""
    original = st.TrainerConfig
    st.TrainerConfig = lambda **kw: original(**{**kw, **fields})
    try:
        yield
    finally:
        st.TrainerConfig = original


class Autocast(nn.Module):
    """Runs a module under the mode's autocast and returns fp32, as Fabric's mixed precision does."""

    def __init__(self, module: nn.Module, device: str, enabled: bool) -> None:
        super().__init__()
        self.module, self.device, self.enabled = module, device, enabled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.enabled):
            return self.module(x).float()


def first_batch(engine) -> Any:
    loader, sampler = engine.loaders["train"]
    sampler.select_epoch(0)
    return engine.task.move_batch(next(iter(loader)), engine.fabric)


def engine_step(engine, batch):
    def run():
        logs = engine.training_step(batch)
        engine.loop.global_step += 1  # what the fit loop does: meta_step_due() sees every 5th step
        return logs
    return run


def teacher_only(engine, batch):
    def run():
        with torch.no_grad():
            context = engine.task.shared_context(batch, engine.teachers, engine.students)
        engine.teacher_records(batch, context).resolve()
    return run


def cifar_members(args, mode: str, work: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """KD engine, MC-Distil engine, hand loop on copies of the KD engine's students, teacher-only forward."""
    fields = trainer_fields(mode, args.device, args.compile_backend)
    students = {s: s for s in args.cfg["students"]}
    data = lambda: st.SyntheticCIFAR(batch_size=args.cfg["batch"], num_train=max(1280, 20 * args.cfg["batch"]))  # noqa: E731
    with trainer_overrides(fields):
        kd = st.make_engine(data(), students, args.cfg["teacher"], work)
        mc = st.make_engine(data(), students, args.cfg["teacher"], work, meta=BilevelConfig(every_n_steps=5), plugins=[
            CNet(use_image=False, use_losses=True, hidden=32, gamma=True, mix=(0.3, 0.5, 0.2), lr=1e-2, weight_decay=1e-4),
            PooledStudent()])
    layout = torch.channels_last if fields["channels_last"] else torch.contiguous_format
    device = torch.device(args.device)
    copies = [copy.deepcopy(m).to(device, memory_format=layout) for m in kd.students.values()]  # before Fabric wraps
    if fields["compile"]:
        copies = [torch.compile(m, backend=fields["compile"]) for m in copies]
    kd.ready_training()
    mc.ready_training()
    bf16 = fields["precision"] == "bf16-mixed"
    # the very same frozen teacher module as the KD engine's (compiled in place there when compiling)
    hand = st.HandLoop([Autocast(m, args.device, bf16) for m in copies], Autocast(kd.teachers["teacher"], args.device, bf16))
    batch, mc_batch = first_batch(kd), first_batch(mc)
    x, y = batch["inputs"], batch["targets"]
    # first warm-up step of KD, both sides, from identical weights: the two losses should agree
    check = abs(float(kd.training_step(batch)["loss"]) - float(hand.step(x, y)))
    kd.global_step += 1
    fns = {"kd": engine_step(kd, batch), "mc_distil": engine_step(mc, mc_batch), "hand": lambda: hand.step(x, y),
           "teacher": teacher_only(kd, batch)}
    return fns, {"batch": int(x.shape[0]), "kd_first_step_abs_loss_diff": check}


def detection_members(args, mode: str, work: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """examples/coco_tiny.yaml's cohort (KD, and MC-Distil via examples/methods/mc_distil_detection.yaml) on shapes data."""
    from collab_distill.cli import engine_from_args
    from collab_distill.tasks.detection.shapes import write_shapes_coco

    root = work / "shapes"
    if not (root / "annotations" / "instances_val2017.json").is_file():
        write_shapes_coco(root, train=64, val=8, size=128)  # ~1 s
    f = trainer_fields(mode, args.device, args.compile_backend)
    over = ["--task.init_args.data.init_args.root", str(root), "--trainer.root_dir", str(work / "runs"),
            "--trainer.progress_bar", "false", "--trainer.loggers", "[]", "--trainer.accelerator", f["accelerator"],
            "--trainer.precision", f["precision"], "--trainer.channels_last", str(f["channels_last"]).lower(),
            *(["--trainer.compile", f["compile"]] if f["compile"] else [])]
    tiny = ["--config", str(REPO / "examples" / "coco_tiny.yaml")]
    kd = engine_from_args([*tiny, *over])
    mc = engine_from_args([*tiny, "--config", str(REPO / "examples" / "methods" / "mc_distil_detection.yaml"), *over,
                           "--trainer.warmup_epochs", "0", "--meta.every_n_steps", "5"])
    for engine in (kd, mc):
        engine.build()
        engine.ready_training()  # randomly initialised teacher: only its cost matters here
    batch, mc_batch = first_batch(kd), first_batch(mc)
    fns = {"kd": engine_step(kd, batch), "mc_distil": engine_step(mc, mc_batch), "teacher": teacher_only(kd, batch)}
    return fns, {"batch": len(batch["images"])}


SETUPS = {"cifar": cifar_members, "detection": detection_members}


def describe(args, setup: str) -> str:
    if setup == "cifar":
        c = args.cfg
        return f"CIFAR-shaped 3x32x32, batch {c['batch']}, students {'/'.join(c['students'])}, teacher {c['teacher']}"
    return "coco_tiny.yaml: Faster R-CNN students xxs/xs/s, teacher m, 128 px shapes, batch 4"


def bench(args, setup: str, mode: str, work: Path) -> list[dict[str, Any]]:
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    fns, info = SETUPS[setup](args, mode, work)
    synced = {k: (lambda f=f: (f(), sync())) for k, f in fns.items()}
    # the MC-Distil engine has done no step yet: warm up over whole meta cycles (a meta step at 0, 5, ...)
    warmup = 5 * -(-args.warmup // 5)
    steps = 5 * -(-args.steps // 5)
    t0 = time.perf_counter()
    times = st.time_interleaved(synced, steps=steps, warmup=warmup, rotate=True)
    batch, teacher = info["batch"], statistics.median(times["teacher"])
    rows = []
    for method in ("kd", "mc_distil"):
        mean = sum(times[method]) / len(times[method])
        row = {"setup": setup, "setup_desc": describe(args, setup), "method": method, "mode": mode, "batch": batch,
               "engine_img_s": batch / mean, "engine_step_ms": st._stats([1e3 * t for t in times[method]]),
               "teacher_ms_median": 1e3 * teacher, "teacher_share": teacher / mean,
               "timed_steps": steps, "warmup_steps": warmup, "measure_s": time.perf_counter() - t0}
        if "hand" in times:
            hand_mean = sum(times["hand"]) / len(times["hand"])
            row.update(hand_img_s=batch / hand_mean, hand_step_ms=st._stats([1e3 * t for t in times["hand"]]),
                       engine_over_hand_time=mean / hand_mean)
            if method == "kd":
                row["first_step_abs_loss_diff"] = info["kd_first_step_abs_loss_diff"]
        rows.append(row)
        hand = (f", hand {row['hand_img_s']:.0f} img/s, engine/hand time {row['engine_over_hand_time']:.3f}"
                if "hand" in times else "")
        print(f"[{setup} {mode} {method}] engine {row['engine_img_s']:.0f} img/s{hand}, "
              f"teacher share {row['teacher_share']:.2f}", flush=True)
    return rows


def _rate(v: float) -> str:
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}"


def markdown(res: dict[str, Any]) -> str:
    env, s = res["environment"], res["settings"]
    lines = [f"# Cohort step throughput by mode ({env['device_name']})", "",
             f"torch {env['torch']}, collab-distill {env['collab_distill']}, threads {env['threads']}, compile backend "
             f"`{s['compile_backend']}`; {s['steps']} timed steps after {s['warmup']} warm-up steps per variant, "
             "engine / hand loop / teacher-only forward interleaved round-robin"
             + (", `torch.cuda.synchronize()` after every call." if s["device"] == "cuda" else "."), ""]
    for setup, desc in res["setups"].items():
        lines += [f"## {setup}: {desc}", "",
                  "| method | mode | engine img/s | vs fp32 | hand img/s | engine/hand time | teacher share "
                  "| engine step ms median (IQR) |", "|---|---|---|---|---|---|---|---|"]
        base = {r["method"]: r["engine_img_s"] for r in res["rows"]
                if r["setup"] == setup and r["mode"] == "fp32" and "error" not in r}
        for r in (r for r in res["rows"] if r["setup"] == setup):
            if "error" in r:
                why = r["error"].splitlines()[-1][:120].replace("|", "/")
                lines.append(f"| {r['method']} | {r['mode']} | failed: {why} | | | | | |")
                continue
            e = r["engine_step_ms"]
            rel = f"{r['engine_img_s'] / base[r['method']]:.2f}x" if r["method"] in base else "–"
            hand = (f"{_rate(r['hand_img_s'])} | {r['engine_over_hand_time']:.3f}" if "hand_img_s" in r else "– | –")
            lines.append(f"| {r['method']} | {r['mode']} | {_rate(r['engine_img_s'])} | {rel} | {hand} "
                         f"| {100 * r['teacher_share']:.0f}% | {e['median']:.1f} ({e['q1']:.1f}–{e['q3']:.1f}) |")
        lines.append("")
    lines += [
        "What the numbers mean:", "",
        "* img/s = batch x timed steps / their summed wall time: one full optimisation step of the whole cohort "
        "(teacher forward, every student's forward/backward, optimizer steps) on a fixed batch already on the device; "
        "no data loading except MC-Distil's meta batch. MC-Distil's steps span whole meta cycles (its bilevel meta "
        "step on every 5th step, exact second-order hypergradient, for detection through the twice-differentiable "
        "RoIAlign); the step-time IQR shows the spread between plain and meta steps.",
        "* hand = `step_time.HandLoop`, KD math written directly in PyTorch on deep copies of the KD engine's "
        "students and the same teacher, under the same autocast / compile / memory format. For MC-Distil it is the "
        "same KD loop, so that ratio is MC-Distil's total cost over plain hand-written KD, not engine overhead. "
        "Detection has no hand loop (its region-level KD needs the shared regions; step costs: detection_meta_step.py).",
        "* engine/hand time = mean engine step time / mean hand step time (1.00: same speed, > 1: engine slower).",
        "* teacher share = median time of the teacher-only forward (the engine's own teacher records on the same "
        "batch: no grad, the mode's autocast, compiled when compiling; for detection also the teacher's RPN "
        "regions) / the method's mean step time. MC-Distil's meta step reuses the step's teacher records.",
        "* vs fp32 = engine img/s relative to the same method in fp32."]
    checks = [f"{r['mode']} {r['first_step_abs_loss_diff']:.1e}" for r in res["rows"] if "first_step_abs_loss_diff" in r]
    if checks:
        lines.append(f"* KD first-step loss check (|engine - hand|, identical weights and batch): {', '.join(checks)}.")
    lines.append("")
    if s["device"] == "cpu":
        lines += ["CPU run (reduced): a shared, busy machine with few timed steps, so the numbers move by ±30% or "
                  "more between runs (fp32+channels_last vs fp32 read 2.2x in one run, 0.8x in the next); bf16 on CPU "
                  "is autocast without bf16 hardware support in most kernels and is not expected to be faster, and "
                  "`aot_eager` only checks that compilation works (no fused kernels). The GPU numbers come from the "
                  "same script on a CUDA machine (`gpu_step.{json,md}`).", ""]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--setups", nargs="+", choices=list(SETUPS), help="default: both on CUDA, cifar on CPU")
    p.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    p.add_argument("--compile-backend", help="default: inductor on CUDA, aot_eager on CPU")
    p.add_argument("--steps", type=int, help="timed steps per variant (rounded up to a multiple of 5)")
    p.add_argument("--warmup", type=int, help="warm-up steps per variant (rounded up to a multiple of 5)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads on CPU")
    p.add_argument("--out", type=Path, default=st.HERE / "results")
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    args.cfg = dict(FULL if cuda else REDUCED)
    args.setups = args.setups or (list(SETUPS) if cuda else ["cifar"])
    args.compile_backend = args.compile_backend or ("inductor" if cuda else "aot_eager")
    args.steps, args.warmup = args.steps or args.cfg["steps"], args.warmup or args.cfg["warmup"]
    if not cuda:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    res: dict[str, Any] = {
        "environment": {"platform": platform.platform(), "python": sys.version.split()[0], "torch": torch.__version__,
                        "collab_distill": collab_distill.__version__, "threads": torch.get_num_threads(),
                        "device_name": torch.cuda.get_device_name() if cuda else f"CPU, {os.cpu_count()} cores",
                        "float32_matmul_precision": torch.get_float32_matmul_precision(),
                        "loadavg": " ".join(f"{v:.2f}" for v in os.getloadavg())},
        "settings": {"device": args.device, "compile_backend": args.compile_backend, "steps": 5 * -(-args.steps // 5),
                     "warmup": 5 * -(-args.warmup // 5), "cifar": args.cfg, "modes": args.modes,
                     "alpha": st.ALPHA, "beta": st.BETA, "tau": st.TAU},
        "setups": {s: describe(args, s) for s in args.setups}, "rows": []}
    with tempfile.TemporaryDirectory(prefix="gpu_step_") as tmp:
        for setup in args.setups:
            for mode in args.modes:
                try:
                    res["rows"] += bench(args, setup, mode, Path(tmp))
                except Exception:  # one failing mode (e.g. a compile error) must not lose the others
                    error = traceback.format_exc()
                    print(error, file=sys.stderr, flush=True)
                    res["rows"] += [{"setup": setup, "method": m, "mode": mode, "error": error} for m in ("kd", "mc_distil")]
                gc.collect()
                torch._dynamo.reset()
                if cuda:
                    torch.cuda.empty_cache()
    res["elapsed_s"] = time.perf_counter() - started
    stem = "gpu_step" if cuda else "gpu_step_cpu"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(res, indent=1) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(res))
    print(markdown(res))
    print(f"wrote {args.out}/{stem}.{{json,md}} in {res['elapsed_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
