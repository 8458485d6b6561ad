"""Engine step time vs a hand-written PyTorch loop, and step time vs the number of students.

What is timed is one optimisation step of the whole cohort on one fixed batch that is already
on the device: teacher forward (no grad), every student's forward, the loss, ``backward``,
every optimizer's ``step`` and ``zero_grad``. On the engine side that is exactly
``Engine.training_step(batch)`` (the real engine, built in-process with the real task, cohort,
trainer and :class:`FixedLossWeights` plugin); on the other side it is a plain PyTorch loop
doing the same math on copies of the same student modules (same initial weights), the same
teacher module and the same SGD settings::

    loss = sum_s mean_i [ alpha * CE(s_i, y_i) + beta * tau^2 * KL(softmax(t_i/tau) || softmax(s_i/tau)) ]
    loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)

Engine and hand-loop steps are interleaved (ABBA ABBA ...) so that drift of the machine (other
processes, thermal state) hits both alike; medians and inter-quartile ranges are reported.

Usage::

    python benchmarks/step_time.py              # default settings, a few minutes on 2 CPU cores
    python benchmarks/step_time.py --quick      # a smoke run (~1 minute)
    python benchmarks/step_time.py --steps 60 --threads 2

Writes ``benchmarks/results/step_time.{json,md}`` and ``step_time_scaling.png`` (``--out``).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

try:
    import resource
except ImportError:  # not on Windows
    resource = None  # type: ignore[assignment]
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms import v2

import collab_distill
from collab_distill import FeatureRequest, Plugin, hookimpl
from collab_distill.config import Cohort, Teacher, TrainerConfig
from collab_distill.engine import Engine
from collab_distill.plugins.fixed_weights import FixedLossWeights
from collab_distill.plugins.hints import FitNets
from collab_distill.tasks.classification import Digits, ImageClassification, ResNet
from collab_distill.tasks.classification.data import ClassificationData
from collab_distill.tasks.classification.sources import LoadedData as _Loaded
from collab_distill.tasks.classification.sources import TensorSource as _TensorSource

HERE = Path(__file__).resolve().parent
ALPHA, BETA, TAU = 0.3, 0.7, 4.0
LR, MOMENTUM, WD = 0.05, 0.9, 5e-4


# ------------------------------------------------------------------------------------ data


class SyntheticCIFAR(ClassificationData):
    """CIFAR-100-shaped random data in memory: uint8 3x32x32 images, 100 classes."""

    mean = (0.5071, 0.4865, 0.4409)
    std = (0.2673, 0.2564, 0.2762)

    def __init__(self, num_train: int = 1280, num_test: int = 256, num_classes: int = 100, batch_size: int = 128,
                 augment: bool = False) -> None:
        super().__init__(meta_fraction=0.1, val_fraction=0.1, augment=augment, batch_size=batch_size)
        self.num_train, self.num_test, self.classes = num_train, num_test, num_classes

    def _load(self) -> _Loaded:
        g = torch.Generator().manual_seed(1234)
        def source(n: int) -> _TensorSource:
            images = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
            return _TensorSource(images, torch.randint(0, self.classes, (n,), generator=g).numpy())
        return _Loaded(source(self.num_train), source(self.num_test), [str(i) for i in range(self.classes)], 3, (32, 32))

    def _augmentation(self, image_size):  # what CIFAR10/CIFAR100 use
        return [v2.RandomCrop(image_size, padding=4), v2.RandomHorizontalFlip()]


# ------------------------------------------------------------------------------------ setups


def make_engine(data: ClassificationData, students: dict[str, str], teacher: str, workdir: Path, seed: int = 0,
                alpha: float = ALPHA, beta: float = BETA, plugins: list[Any] | None = None, meta: Any = None) -> Engine:
    """The real engine (FixedLossWeights: KD, or CE with beta=0, unless ``plugins`` are given),
    set up for training but not fitting."""
    info = data.setup(seed)
    torch.manual_seed(99)
    teacher_path = workdir / f"teacher_{teacher}_{info.in_channels}x{info.image_size[0]}_{info.num_classes}.pt"
    if not teacher_path.exists():  # a randomly initialised teacher: its cost is what matters
        torch.save(ResNet(teacher).build(info).state_dict(), teacher_path)
    engine = Engine(
        task=ImageClassification(data),
        cohort=Cohort(
            students={name: ResNet(size) for name, size in students.items()},
            teachers={"teacher": Teacher(model=ResNet(teacher), checkpoint=str(teacher_path))},
        ),
        trainer=TrainerConfig(accelerator="cpu", progress_bar=False, loggers=[], max_epochs=1,
                              temperature=TAU, root_dir=str(workdir / "runs")),
        optimizer=lambda params: torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, weight_decay=WD),
        plugins=plugins if plugins is not None else [FixedLossWeights(alpha=alpha, beta=beta)],
        meta=meta,
        seed=seed,
    )
    engine.build()
    return engine


class HandLoop:
    """The same step written directly in PyTorch (one SGD over all students' parameters).

    With ``beta == 0`` (CE) it does what a hand-written CE loop does: it never runs the teacher.
    """

    def __init__(self, students: list[torch.nn.Module], teacher: torch.nn.Module, alpha: float = ALPHA,
                 beta: float = BETA) -> None:
        self.students = students
        self.teacher = teacher
        self.alpha, self.beta = alpha, beta
        params = [p for m in students for p in m.parameters()]
        self.opt = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, weight_decay=WD)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.beta == 0:
            loss = 0.0
            for m in self.students:
                loss = loss + self.alpha * F.cross_entropy(m(x), y)
        else:
            with torch.no_grad():
                p_t = F.softmax(self.teacher(x) / TAU, dim=1)
            loss = 0.0
            for m in self.students:
                s = m(x)
                ce = F.cross_entropy(s, y, reduction="none")
                kl = F.kl_div(F.log_softmax(s / TAU, dim=1), p_t, reduction="none").sum(1)
                loss = loss + (self.alpha * ce + self.beta * TAU * TAU * kl).mean()
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.detach()


def build_pair(data_factory: Callable[[], ClassificationData], students: dict[str, str], teacher: str, workdir: Path,
               alpha: float = ALPHA, beta: float = BETA):
    """An engine ready for ``training_step``, a hand loop on identical copies, and a fixed batch."""
    engine = make_engine(data_factory(), students, teacher, workdir, alpha=alpha, beta=beta)
    copies = [copy.deepcopy(m) for m in engine.students.values()]  # before Fabric wraps them
    engine.ready_training()
    hand = HandLoop(copies, engine.teachers["teacher"], alpha, beta)  # the very same (frozen, eval) teacher
    loader, sampler = engine.loaders["train"]
    sampler.select_epoch(0)
    batch = engine.task.move_batch(next(iter(loader)), engine.fabric)
    return engine, hand, batch


# ------------------------------------------------------------------------------------ timing


def _stats(values: list[float]) -> dict[str, float]:
    q1, med, q3 = np.percentile(values, [25, 50, 75])
    return {"median": float(med), "q1": float(q1), "q3": float(q3), "iqr": float(q3 - q1), "min": float(min(values)),
            "mean": float(np.mean(values)), "n": len(values)}


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource is not None else 0


def time_interleaved(fns: dict[str, Callable[[], Any]], steps: int, warmup: int, rotate: bool = False,
                     faults: dict[str, list[int]] | None = None) -> dict[str, list[float]]:
    """Time each function ``steps`` times, alternating the order every round (ABBA...); with
    ``rotate`` the starting function also moves by one every round (round-robin). ``faults``
    receives the minor page faults of every timed call (on CPU a sign of memory being returned to
    and re-requested from the OS between steps)."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    gc.collect()
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(steps):
        order = names[i % len(names):] + names[: i % len(names)] if rotate else names
        order = order if i % 2 == 0 else order[::-1]
        for n in order:
            f0 = _minor_faults()
            t0 = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t0)
            if faults is not None:
                faults.setdefault(n, []).append(_minor_faults() - f0)
    return times


def check_equal_losses(data_factory, students, teacher, workdir, steps: int = 3, **weights: float) -> dict[str, Any]:
    """Engine and hand loop from the same weights on the same batch: losses of ``steps`` steps."""
    engine, hand, batch = build_pair(data_factory, students, teacher, workdir, **weights)
    diffs, pairs = [], []
    for _ in range(steps):
        le = float(engine.training_step(batch)["loss"])
        lh = float(hand.step(batch["inputs"], batch["targets"]))
        diffs.append(abs(le - lh))
        pairs.append((le, lh))
    with torch.no_grad():
        param_diff = max(
            float((pe - ph).abs().max())
            for me, mh in zip(engine.students.values(), hand.students)
            for pe, ph in zip(me.parameters(), mh.parameters())
        )
    return {"steps": steps, "losses_engine_hand": pairs, "max_abs_loss_diff": max(diffs),
            "max_rel_loss_diff": max(d / abs(p[1]) for d, p in zip(diffs, pairs)),
            "max_abs_param_diff_after": param_diff}


def bench_ratio(name: str, data_factory, students, teacher, workdir, steps, warmup, alpha=ALPHA, beta=BETA) -> dict[str, Any]:
    check = check_equal_losses(data_factory, students, teacher, workdir, alpha=alpha, beta=beta)
    print(f"[{name}] loss check: |engine - hand| = {check['max_abs_loss_diff']:.2e} "
          f"(rel {check['max_rel_loss_diff']:.1e}) over {check['steps']} steps; "
          f"max |param diff| after = {check['max_abs_param_diff_after']:.1e}", flush=True)
    engine, hand, batch = build_pair(data_factory, students, teacher, workdir, alpha=alpha, beta=beta)
    x, y = batch["inputs"], batch["targets"]
    faults: dict[str, list[int]] = {}
    times = time_interleaved({"engine": lambda: engine.training_step(batch), "hand": lambda: hand.step(x, y)}, steps, warmup,
                             faults=faults)
    ratios = [e / h for e, h in zip(times["engine"], times["hand"])]
    out = {
        "setup": name, "students": students, "teacher": teacher, "alpha": alpha, "beta": beta,
        "input_shape": list(x.shape), "num_classes": int(engine.info.num_classes),
        "engine_s": _stats(times["engine"]), "hand_s": _stats(times["hand"]),
        "ratio_of_medians": statistics.median(times["engine"]) / statistics.median(times["hand"]),
        "ratio_of_minima": min(times["engine"]) / min(times["hand"]),
        "paired_ratio": _stats(ratios), "loss_check": check,
        "overhead_ms": 1e3 * (statistics.median(times["engine"]) - statistics.median(times["hand"])),
        "minor_page_faults_per_step": {k: statistics.median(v) for k, v in faults.items()},
    }
    print(f"[{name}] engine {out['engine_s']['median']*1e3:.1f} ms, hand {out['hand_s']['median']*1e3:.1f} ms, "
          f"ratio {out['ratio_of_medians']:.3f} (paired median {out['paired_ratio']['median']:.3f}, "
          f"IQR {out['paired_ratio']['q1']:.3f}-{out['paired_ratio']['q3']:.3f})", flush=True)
    return out


class IdleFeatureRequests(Plugin):
    """Requests ``layer3`` of every member but is never active: the forward hooks are registered
    and fire, nothing is captured (what a feature plugin costs on the steps that do not use it)."""

    @hookimpl
    def collab_distill_feature_requests(self, engine):
        return [FeatureRequest(m, "layer3", lambda engine, phase: False)
                for m in [*engine.cohort.students, *engine.cohort.teachers]]


def bench_features(name: str, data_factory, students, teacher, workdir, steps, warmup) -> dict[str, Any]:
    """KD, KD with idle feature hooks, and FitNets hints on layer3 + KD, timed interleaved on one
    fixed batch (``Engine.training_step``)."""
    variants = {
        "kd": [FixedLossWeights(alpha=ALPHA, beta=BETA)],
        "kd_idle_hooks": [FixedLossWeights(alpha=ALPHA, beta=BETA), IdleFeatureRequests()],
        "fitnets": [FixedLossWeights(alpha=ALPHA, beta=BETA), FitNets(student_features=["layer3"], weight=100.0)],
    }
    engines, batch = {}, None
    for key, plugins in variants.items():
        engine = make_engine(data_factory(), students, teacher, workdir, plugins=plugins)
        engine.ready_training()
        if batch is None:
            loader, sampler = engine.loaders["train"]
            sampler.select_epoch(0)
            batch = engine.task.move_batch(next(iter(loader)), engine.fabric)
        engines[key] = engine
    times = time_interleaved({k: (lambda e=e: e.training_step(batch)) for k, e in engines.items()}, steps, warmup, rotate=True)
    out: dict[str, Any] = {"setup": name, "students": students, "teacher": teacher, "input_shape": list(batch["inputs"].shape),
                           "step_s": {k: _stats(v) for k, v in times.items()}}
    for key in ("kd_idle_hooks", "fitnets"):
        paired = [a / b for a, b in zip(times[key], times["kd"])]
        out[f"{key}_vs_kd"] = {"ratio_of_medians": statistics.median(times[key]) / statistics.median(times["kd"]),
                               "ratio_of_minima": min(times[key]) / min(times["kd"]), "paired": _stats(paired)}
    print(f"[{name}] KD {out['step_s']['kd']['median']*1e3:.1f} ms; idle hooks / KD "
          f"{out['kd_idle_hooks_vs_kd']['ratio_of_medians']:.3f}; FitNets / KD {out['fitnets_vs_kd']['ratio_of_medians']:.3f}",
          flush=True)
    return out


def bench_scaling(label: str, sizes: list[str], teacher: str, data_factory, workdir, steps, warmup) -> dict[str, Any]:
    """Engine (and hand loop) step time for the first k of ``sizes``, k = 1..len(sizes).

    All cohorts are built first and timed round-robin (the order rotates every round), so that a
    change in the machine's load affects every k alike instead of biasing the slope.
    """
    pairs, fns = {}, {}
    for k in range(1, len(sizes) + 1):
        students = {f"{sizes[i]}_{i}": sizes[i] for i in range(k)}
        engine, hand, batch = build_pair(data_factory, students, teacher, workdir)
        pairs[k] = (engine, hand, batch, students)
        fns[f"engine_{k}"] = (lambda e=engine, b=batch: e.training_step(b))
        fns[f"hand_{k}"] = (lambda h=hand, b=batch: h.step(b["inputs"], b["targets"]))
    faults: dict[str, list[int]] = {}
    times = time_interleaved(fns, steps, warmup, rotate=True, faults=faults)
    rows = []
    for k, (engine, _hand, _batch, students) in pairs.items():
        te, th = times[f"engine_{k}"], times[f"hand_{k}"]
        macs = sum(engine.model_summary[n]["macs"] for n in students)
        e, h = _stats(te), _stats(th)
        rows.append({"k": k, "students": list(students.values()), "student_macs_per_image": macs,
                     "engine_s": e, "hand_s": h, "ratio_of_medians": e["median"] / h["median"],
                     "paired_ratio": _stats([a / b for a, b in zip(te, th)]),
                     "minor_page_faults_per_step": {"engine": statistics.median(faults[f"engine_{k}"]),
                                                    "hand": statistics.median(faults[f"hand_{k}"])}})
        print(f"[scaling {label}] k={k} {list(students.values())}: engine {e['median']*1e3:.1f} ms "
              f"(IQR {e['iqr']*1e3:.1f}, min {e['min']*1e3:.1f}), hand {h['median']*1e3:.1f} ms, "
              f"ratio {rows[-1]['ratio_of_medians']:.3f}", flush=True)
    del pairs, fns
    gc.collect()
    ks = np.array([r["k"] for r in rows], dtype=float)
    out = {"label": label, "sizes": sizes, "teacher": teacher, "rows": rows,
           "fit_vs_k": _linfit(ks, np.array([r["engine_s"]["median"] for r in rows])),
           "fit_vs_k_min": _linfit(ks, np.array([r["engine_s"]["min"] for r in rows])),
           "hand_fit_vs_k": _linfit(ks, np.array([r["hand_s"]["median"] for r in rows]))}
    if len(set(sizes)) > 1:  # different students: cost should be linear in their summed MACs, not in k
        m = np.array([r["student_macs_per_image"] for r in rows], dtype=float) / 1e6
        out["fit_vs_student_mmacs"] = _linfit(m, np.array([r["engine_s"]["median"] for r in rows]))
    return out


def _augment_seeded_all_devices(seed: int, fn: Callable[[], Any]) -> Any:
    """``augment_seeded`` as it was before commit 48c7e91: ``torch.manual_seed`` also (lazily)
    seeds CUDA/XPU/MTIA, and with those not initialised every call records 3 Python stack traces."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fn()


def bench_loader(name: str, data_factory, workdir: Path, epochs: int) -> dict[str, Any]:
    """Time per training batch of the engine's own loader (num_workers=0, seeded augmentation)
    with the current ``augment_seeded`` and with the former ``torch.manual_seed`` version; the
    variants alternate by epoch (ABBA) and must give identical pixels."""
    import collab_distill.tasks.classification.sources as data_module  # SplitDataset's augment_seeded

    engine = make_engine(data_factory(), {"xxs": "xxs"}, "xxs", workdir)
    engine.ready_training()
    loader, sampler = engine.loaders["train"]
    current = data_module.augment_seeded
    per_batch: dict[str, list[float]] = {"current": [], "torch_manual_seed": []}
    pixels: dict[str, list[torch.Tensor]] = {}
    try:
        for epoch in range(2 * epochs):
            variant = ("current", "torch_manual_seed")[(epoch + epoch // 2) % 2]
            data_module.augment_seeded = current if variant == "current" else _augment_seeded_all_devices
            sampler.select_epoch(0)  # the same batches every time, so pixels can be compared
            t0 = time.perf_counter()
            batches = [b["inputs"] for b in loader]
            per_batch[variant].append((time.perf_counter() - t0) / len(batches))
            pixels.setdefault(variant, batches)
    finally:
        data_module.augment_seeded = current
    same = all(torch.equal(a, b) for a, b in zip(pixels["current"], pixels["torch_manual_seed"]))
    out = {"setup": name, "batch_shape": list(pixels["current"][0].shape), "batches_per_epoch": len(pixels["current"]),
           "current_s_per_batch": _stats(per_batch["current"]),
           "torch_manual_seed_s_per_batch": _stats(per_batch["torch_manual_seed"]), "identical_pixels": same}
    print(f"[loader {name}] {out['current_s_per_batch']['median']*1e3:.2f} ms/batch now, "
          f"{out['torch_manual_seed_s_per_batch']['median']*1e3:.2f} ms/batch with torch.manual_seed (same pixels: {same})",
          flush=True)
    return out


def _linfit(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    slope, intercept = np.polyfit(x, y, 1)
    pred = slope * x + intercept
    ss_res, ss_tot = float(((y - pred) ** 2).sum()), float(((y - y.mean()) ** 2).sum())
    return {"slope_s": float(slope), "intercept_s": float(intercept), "r2": 1 - ss_res / ss_tot if ss_tot else 1.0,
            "max_rel_residual": float(np.max(np.abs(y - pred) / y))}


# ------------------------------------------------------------------------------------ report


def _ms(s: dict[str, float]) -> str:
    return f"{s['median']*1e3:.1f} ({s['q1']*1e3:.1f}–{s['q3']*1e3:.1f})"


def _signed(ms: float, digits: int = 1) -> str:
    return f"{'+' if ms >= 0 else '−'} {abs(ms):.{digits}f}"


def _faults(row: dict[str, Any]) -> str:
    f = row.get("minor_page_faults_per_step")
    if not f:
        return "–"
    fmt = lambda v: f"{v / 1e3:.1f}k" if v >= 1000 else f"{v:.0f}"  # noqa: E731
    return f"{fmt(f['engine'])} / {fmt(f['hand'])}"


def markdown(res: dict[str, Any]) -> str:
    env = res["environment"]
    lines = [
        "# Step time: engine vs hand-written loop",
        "",
        f"{env['platform']}, {env['cpu_count']} CPU cores, torch {env['torch']} (threads={env['threads']}), "
        f"collab-distill {env['collab_distill']}; {res['settings']['steps']} timed steps per measurement after "
        f"{res['settings']['warmup']} warm-up steps ({res['settings']['scaling_steps']} per k in the scaling sweeps), "
        "engine/hand interleaved ABBA. Times: median (IQR) in ms per cohort step (teacher forward + all students "
        "forward/backward + optimizer steps). Paired ratio: engine/hand of adjacent steps. The machine is shared: "
        f"load average {res['environment']['loadavg_start']} at the start and {res['environment'].get('loadavg_end')} "
        "at the end; the ratio of minima estimates the uncontended ratio.",
        "",
        "| setup | input | students | teacher (alpha, beta) | engine ms | hand ms | engine/hand (ratio of medians) "
        "| paired ratio median (IQR) | ratio of minima | page faults/step engine / hand | loss check abs diff |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["ratio"]:
        pr = r["paired_ratio"]
        lines.append(
            f"| {r['setup']} | {'x'.join(map(str, r['input_shape']))} | {', '.join(r['students'].values())} "
            f"| {r['teacher']} ({r['alpha']:g}, {r['beta']:g}) "
            f"| {_ms(r['engine_s'])} | {_ms(r['hand_s'])} | **{r['ratio_of_medians']:.3f}** "
            f"| {pr['median']:.3f} ({pr['q1']:.3f}–{pr['q3']:.3f}) | {r['ratio_of_minima']:.3f} | {_faults(r)} "
            f"| {r['loss_check']['max_abs_loss_diff']:.1e} |"
        )
    lines += ["", "CE rows (alpha=1, beta=0): the teacher is in the cohort, as when composing examples/methods/ce.yaml "
              "with examples/digits.yaml; the hand loop never runs it, and the engine must not either (its teacher "
              "records are lazy and a term whose constant weight is 0 is skipped).",
              "", f"Goal: engine/hand ≤ 1.05. Loss check: the engine's `loss` and the hand loop's loss over "
              f"{res['ratio'][0]['loss_check']['steps']} successive steps from identical weights on the same batch.", ""]
    for sc in res["scaling"]:
        f = sc["fit_vs_k"]
        lines += [
            f"## Scaling with the number of students: {sc['label']}",
            "",
            f"Students {', '.join(sc['sizes'])} (the first k), teacher ResNet({sc['teacher']}), "
            f"input {'x'.join(map(str, res['scaling_input_shape']))}.",
            "",
            "| k | students | student MMACs/image | engine ms | hand ms | engine/hand | page faults/step engine / hand |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in sc["rows"]:
            lines.append(f"| {row['k']} | {', '.join(row['students'])} | {row['student_macs_per_image']/1e6:.2f} "
                         f"| {_ms(row['engine_s'])} | {_ms(row['hand_s'])} | {row['ratio_of_medians']:.3f} "
                         f"| {_faults(row)} |")
        hf = sc["hand_fit_vs_k"]
        lines += ["", f"Engine time vs k: {f['slope_s']*1e3:.1f} ms per student {_signed(f['intercept_s']*1e3)} ms, "
                  f"R² = {f['r2']:.4f}, largest relative residual {100*f['max_rel_residual']:.1f}% "
                  f"(hand loop: {hf['slope_s']*1e3:.1f} ms/student {_signed(hf['intercept_s']*1e3)} ms, R² = {hf['r2']:.4f}; "
                  f"engine fit on the per-k minimum times: {sc['fit_vs_k_min']['slope_s']*1e3:.1f} ms/student "
                  f"{_signed(sc['fit_vs_k_min']['intercept_s']*1e3)} ms, R² = {sc['fit_vs_k_min']['r2']:.4f})."]
        if "fit_vs_student_mmacs" in sc:
            g = sc["fit_vs_student_mmacs"]
            lines.append(f"Engine time vs the students' summed MACs: {g['slope_s']*1e3:.1f} ms per MMAC/image "
                         f"{_signed(g['intercept_s']*1e3)} ms, R² = {g['r2']:.4f}.")
        lines += ["", sc.get("verdict", ""), ""]
    if res.get("loader"):
        lines += [
            "## Data loading (not part of the step above)",
            "",
            "Time per training batch of the engine's own loader (`num_workers=0`, per-sample seeded augmentation) "
            "with the current `collab_distill.data.augment_seeded` (seeds only `torch.default_generator`) and with "
            "its former version (`torch.manual_seed`, which also lazily seeds CUDA/XPU/MTIA and, with those not "
            "initialised, records three Python stack traces per call); median (IQR) over epochs.",
            "",
            "| data | batch | current ms/batch | torch.manual_seed ms/batch | speed-up | same pixels |",
            "|---|---|---|---|---|---|",
        ]
        for r in res["loader"]:
            a, b = r["current_s_per_batch"], r["torch_manual_seed_s_per_batch"]
            lines.append(f"| {r['setup']} | {'x'.join(map(str, r['batch_shape']))} | {_ms(a)} | {_ms(b)} "
                         f"| {b['median']/a['median']:.1f}x | {r['identical_pixels']} |")
        lines.append("")
    if res.get("features"):
        lines += [
            "## Feature capture",
            "",
            "One cohort step (`Engine.training_step`) with KD; with KD plus idle feature hooks (`layer3` of every member "
            "requested but never active: the hooks fire, nothing is kept); and with FitNets hints on `layer3` "
            "(a 1x1 conv + BN + ReLU regressor per student, MSE to the teacher's `layer3`) + KD. The three engines are "
            "timed round-robin on one fixed batch. Median (IQR) ms per step; ratios to KD.",
            "",
            "| setup | input | KD ms | idle hooks ms | FitNets ms | idle hooks / KD (medians, minima) "
            "| FitNets / KD (medians, minima) |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in res["features"]:
            t, idle, fit = r["step_s"], r["kd_idle_hooks_vs_kd"], r["fitnets_vs_kd"]
            lines.append(f"| {r['setup']} ({', '.join(r['students'])}; teacher {r['teacher']}) "
                         f"| {'x'.join(map(str, r['input_shape']))} "
                         f"| {_ms(t['kd'])} | {_ms(t['kd_idle_hooks'])} | {_ms(t['fitnets'])} "
                         f"| {idle['ratio_of_medians']:.3f}, {idle['ratio_of_minima']:.3f} "
                         f"| {fit['ratio_of_medians']:.3f}, {fit['ratio_of_minima']:.3f} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(res["scaling"]), figsize=(5.5 * len(res["scaling"]), 4), squeeze=False)
    for ax, sc in zip(axes[0], res["scaling"]):
        ks = [r["k"] for r in sc["rows"]]
        by_macs = "fit_vs_student_mmacs" in sc  # students of different sizes: cost follows their MACs, not k
        xs = np.array([r["student_macs_per_image"] / 1e6 for r in sc["rows"]]) if by_macs else np.array(ks, dtype=float)
        shift = 0.012 * (xs.max() - xs.min() or 1)
        for key, label, color, dx in (("engine_s", "engine", "C0", -shift), ("hand_s", "hand loop", "C1", shift)):
            med = np.array([r[key]["median"] for r in sc["rows"]]) * 1e3
            lo = med - np.array([r[key]["q1"] for r in sc["rows"]]) * 1e3
            hi = np.array([r[key]["q3"] for r in sc["rows"]]) * 1e3 - med
            ax.errorbar(xs + dx, med, yerr=[lo, hi], fmt="o", color=color, label=f"{label} (median, IQR)", capsize=3)
        f = sc["fit_vs_student_mmacs"] if by_macs else sc["fit_vs_k"]
        grid = np.linspace(0 if by_macs else 1, xs.max(), 50)
        unit = "ms/MMAC" if by_macs else "ms/student"
        ax.plot(grid, (f["slope_s"] * grid + f["intercept_s"]) * 1e3, "--", color="C0",
                label=f"engine fit: {f['slope_s']*1e3:.1f} {unit} {_signed(f['intercept_s']*1e3, 0)} ms (R²={f['r2']:.3f})")
        if by_macs:
            for x, k, r in zip(xs, ks, sc["rows"]):
                ax.annotate(f"k={k}", (x, r["engine_s"]["median"] * 1e3), textcoords="offset points", xytext=(6, -12), fontsize=7)
            ax.set_xlabel("students' summed forward MMACs per image (first k of the list)")
        else:
            ax.set_xlabel("students k")
            ax.set_xticks(ks)
        ax.set_ylabel("ms per cohort step")
        ax.set_title(f"{sc['label']}: {','.join(sc['sizes'])}; teacher {sc['teacher']}", fontsize=9)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def verdict(sc: dict[str, Any]) -> str:
    f = sc["fit_vs_k"]
    if len(set(sc["sizes"])) == 1:
        linear = f["r2"] >= 0.99 and f["max_rel_residual"] < 0.05
        return (f"Verdict: {'linear' if linear else 'not clearly linear'} in k for identical students "
                f"(R² {f['r2']:.4f}); each added student costs {f['slope_s']*1e3:.1f} ms, the intercept "
                f"({f['intercept_s']*1e3:.1f} ms) is mostly the teacher's forward pass.")
    g = sc.get("fit_vs_student_mmacs", {})
    return (f"Verdict: with students of different sizes the time is not expected to be linear in k "
            f"(R² vs k {f['r2']:.4f}); it is {'linear' if g.get('r2', 0) >= 0.99 else 'roughly linear'} in the "
            f"students' summed MACs (R² {g.get('r2', float('nan')):.4f}).")


# ------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30, help="timed steps per measurement (per side)")
    p.add_argument("--scaling-steps", type=int, default=None, help="timed steps per k and side (default: 2/3 of --steps)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads; 1 by default because a shared 2-core machine makes 2 threads very noisy")
    p.add_argument("--batch-size", type=int, default=128, help="batch of the CIFAR-shaped setups")
    p.add_argument("--quick", action="store_true", help="few steps, smaller scaling sweep (smoke test)")
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--render-only", action="store_true", help="only rewrite the .md and .png from the .json in --out")
    p.add_argument("--only-features", action="store_true",
                   help="rerun only the feature-capture rows and merge them into the stored step_time.json")
    args = p.parse_args(argv)
    if args.render_only:
        res = json.loads((args.out / "step_time.json").read_text())
        (args.out / "step_time.md").write_text(markdown(res))
        plot(res, args.out / "step_time_scaling.png")
        return 0
    if args.quick:
        args.steps, args.warmup = 6, 1
    scaling_steps = args.scaling_steps or max(4, (2 * args.steps) // 3)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    cifar = lambda: SyntheticCIFAR(batch_size=args.batch_size)  # noqa: E731
    digits = lambda: Digits(batch_size=64, meta_fraction=0.1, val_fraction=0.1)  # noqa: E731
    if args.only_features:
        res = json.loads((args.out / "step_time.json").read_text())
        with tempfile.TemporaryDirectory(prefix="step_time_") as tmp:
            res["features"] = [bench_features("cifar-shaped", cifar, {"xxs": "xxs", "xs": "xs", "s": "s", "m": "m"}, "l",
                                              Path(tmp), args.steps, args.warmup)]
        res["features_measured"] = {"threads": torch.get_num_threads(), "steps": args.steps,
                                    "loadavg": " ".join(f"{v:.2f}" for v in os.getloadavg()),
                                    "elapsed_s": time.perf_counter() - started}
        (args.out / "step_time.json").write_text(json.dumps(res, indent=1) + "\n")
        (args.out / "step_time.md").write_text(markdown(res))
        return 0
    res: dict[str, Any] = {
        "environment": {"platform": platform.platform(), "python": sys.version.split()[0], "torch": torch.__version__,
                        "collab_distill": collab_distill.__version__, "cpu_count": os.cpu_count(),
                        "threads": torch.get_num_threads(), "device": "cpu",
                        "loadavg_start": " ".join(f"{v:.2f}" for v in os.getloadavg())},
        "settings": {"steps": args.steps, "scaling_steps": scaling_steps, "warmup": args.warmup,
                     "alpha": ALPHA, "beta": BETA, "tau": TAU, "sgd": {"lr": LR, "momentum": MOMENTUM, "weight_decay": WD},
                     "quick": args.quick},
        "ratio": [], "scaling": [], "loader": [],
    }
    with tempfile.TemporaryDirectory(prefix="step_time_") as tmp:
        work = Path(tmp)
        res["ratio"].append(bench_ratio("cifar-shaped KD", cifar, {"xxs": "xxs", "xs": "xs", "s": "s", "m": "m"}, "l",
                                        work, args.steps, args.warmup))
        res["ratio"].append(bench_ratio("digits KD (examples/digits.yaml)", digits, {"xxs": "xxs", "xs": "xs", "s": "s"}, "m",
                                        work, max(args.steps, 60), args.warmup))
        # CE (beta=0) with the teacher still in the cohort, as examples/methods/ce.yaml on digits.yaml runs:
        # the hand loop skips the unused teacher; so must the engine.
        res["ratio"].append(bench_ratio("cifar-shaped CE, teacher in cohort", cifar,
                                        {"xxs": "xxs", "xs": "xs", "s": "s", "m": "m"},
                                        "l", work, args.steps, args.warmup, alpha=1.0, beta=0.0))
        res["ratio"].append(bench_ratio("digits CE, teacher in cohort", digits, {"xxs": "xxs", "xs": "xs", "s": "s"}, "m",
                                        work, max(args.steps, 60), args.warmup, alpha=1.0, beta=0.0))
        res["features"] = [bench_features("cifar-shaped", cifar, {"xxs": "xxs", "xs": "xs", "s": "s", "m": "m"}, "l",
                                          work, args.steps, args.warmup)]
        sweeps = [("identical students", ["s"] * 5), ("mixed sizes", ["xxs", "xs", "s", "m", "l"])]
        if args.quick:
            sweeps = [("identical students", ["s"] * 3)]
        for label, sizes in sweeps:
            sc = bench_scaling(label, sizes, "l", cifar, work, scaling_steps, args.warmup)
            sc["verdict"] = verdict(sc)
            print(sc["verdict"], flush=True)
            res["scaling"].append(sc)
        loader_epochs = 2 if args.quick else 5
        res["loader"].append(bench_loader("digits (batch 64, 1x8x8, random translation)", digits, work, loader_epochs))
        res["loader"].append(bench_loader("cifar-shaped (batch 128, 3x32x32, crop+flip)",
                                          lambda: SyntheticCIFAR(batch_size=args.batch_size, augment=True), work, loader_epochs))
    res["scaling_input_shape"] = [args.batch_size, 3, 32, 32]
    res["environment"]["loadavg_end"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    res["elapsed_s"] = time.perf_counter() - started
    (args.out / "step_time.json").write_text(json.dumps(res, indent=1) + "\n")
    (args.out / "step_time.md").write_text(markdown(res))
    plot(res, args.out / "step_time_scaling.png")
    print(f"wrote {args.out}/step_time.{{json,md}} and step_time_scaling.png in {res['elapsed_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
