"""The training step reads nothing from the device except on logging steps.

On a GPU every ``.item()``, ``.cpu()``, ``.tolist()``, ``float(t)``, ``int(t)``, ``bool(t)`` of a
device tensor waits for the queued kernels; a step that does this every time cannot overlap
host and device work. This CPU test counts those calls inside ``Engine.training_step`` on
non-logging steps (meta steps included) and expects none; on a CUDA machine it also runs the
steps under ``torch.cuda.set_sync_debug_mode("error")``.
"""

from __future__ import annotations

import contextlib
import os
import traceback
from collections import Counter

import pytest
import torch

from collab_distill.meta import BilevelConfig
from collab_distill.plugins.fixed_weights import FixedLossWeights
from collab_distill.plugins.hints import FitNets
from collab_distill.plugins.mc_distil import CNet, PooledStudent
from collab_distill.testing import tiny_engine

READS = ("item", "cpu", "tolist", "numpy", "__float__", "__int__", "__bool__", "__index__")


#: reads of tensors that stay on the host on a GPU too: torch's optimizers keep their step counts
#: on the CPU (``Adam``'s ``step.item()``), the seeded sampler's indices are host tensors
HOST_SIDE = (os.sep + os.path.join("torch", "optim") + os.sep, os.path.join("collab_distill", "data.py"))


@contextlib.contextmanager
def counting_reads(counter: Counter):
    originals = {name: getattr(torch.Tensor, name) for name in READS}

    def wrap(name, original):
        def counted(self, *args, **kwargs):
            frames = traceback.extract_stack(limit=8)[:-1]
            if not any(part in frame.filename for frame in frames for part in HOST_SIDE):
                counter[f"{name} at {frames[-1].filename.rsplit(os.sep, 1)[-1]}:{frames[-1].lineno}"] += 1
            return original(self, *args, **kwargs)
        return counted

    for name, original in originals.items():
        setattr(torch.Tensor, name, wrap(name, original))
    try:
        yield counter
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def steps_without_reads(engine, steps: int) -> Counter:
    engine.ready_training()
    loader, sampler = engine.loaders["train"]
    sampler.select_epoch(0)
    batches = iter(loader)
    counter: Counter = Counter()
    for i in range(steps):
        batch = engine.task.move_batch(next(batches), engine.fabric)
        engine.loop.global_step = i
        if i == 0:  # the first step checks the loss's graph once, and warms caches
            engine.training_step(batch)
            continue
        sync_debug = torch.cuda.is_available() and str(engine.fabric.device).startswith("cuda")
        if sync_debug:
            torch.cuda.set_sync_debug_mode("error")
        try:
            with counting_reads(counter):
                engine.training_step(batch)
        finally:
            if sync_debug:
                torch.cuda.set_sync_debug_mode("default")
    return counter


@pytest.mark.parametrize("method", ["kd", "mc_distil", "fitnets"])
def test_no_host_reads_in_non_logging_steps(tmp_path, method):
    plugins = {
        "kd": [FixedLossWeights(alpha=0.3, beta=0.7)],
        # a meta step every 2nd step, second order, through the C-Net on the members' losses
        "mc_distil": [CNet(use_image=False, use_losses=True, hidden=8, gamma=True, mix=[0.3, 0.5, 0.2]), PooledStudent()],
        "fitnets": [FixedLossWeights(alpha=0.3, beta=0.7), FitNets(weight=10.0)],
    }[method]
    engine = tiny_engine(plugins, root_dir=tmp_path, log_every_n_steps=1000,
                         meta=BilevelConfig(every_n_steps=2))
    counter = steps_without_reads(engine, steps=5)
    assert counter == Counter(), f"host reads in non-logging steps: {dict(counter)}"
    if method == "mc_distil":
        assert engine.meta_history == []  # meta steps of steps 1, 3 and 5 ran; their numbers are read later
        engine.flush_meta_history()
        assert [h["step"] for h in engine.meta_history] == [1, 3, 5]
