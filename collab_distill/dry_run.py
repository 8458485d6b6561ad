"""``collab-distill fit --dry_run true``: check a run's data and models here, in one process,
before it goes to a cluster.

The config is parsed and validated as ``fit`` would; then the data splits are read and every
model is built (weight files loaded) on this machine's CPU, whatever ``trainer.accelerator``,
``devices`` and ``num_nodes`` say, and the run's shape under those settings is printed: images per
split, per-rank batch, steps per epoch per rank and the effective batch. Nothing is trained and
no file is written.
"""

from __future__ import annotations

import math
from collections.abc import Sized
from dataclasses import replace
from typing import Any, cast

from collab_distill import console
from collab_distill.data import SeededSampler
from collab_distill.run_folder import check_run_target

__all__ = ["dry_run"]


def _world_size(devices: Any, num_nodes: int) -> int:
    """Processes the planned run starts (``devices: auto`` or a device list counts as given)."""
    if isinstance(devices, int):
        return devices * num_nodes
    if isinstance(devices, (list, tuple)):
        return len(devices) * num_nodes
    text = str(devices).strip()
    if text.isdigit():
        return int(text) * num_nodes
    if "," in text:
        return len([d for d in text.split(",") if d.strip()]) * num_nodes
    return num_nodes  # "auto": at least one device per node; unknown until launched there


def dry_run(engine: Any) -> dict[str, Any]:
    """Set up a copy of ``engine`` (an unset engine) on this machine's CPU in one process and
    return (and print) the plan of the run its trainer settings describe."""
    planned = engine.trainer
    world = _world_size(planned.devices, planned.num_nodes)
    local = replace(planned, accelerator="cpu", devices=1, num_nodes=1, strategy="auto", precision="32-true")
    engine = type(engine)(**engine.spec.derive(trainer=local).arguments())
    engine.build()
    check_run_target(local, None)
    task = engine.task
    splits: dict[str, dict[str, int]] = {}
    for split in ("train", "meta", "val", "test"):
        size = len(cast(Sized, task.dataset(split)))
        batch = int(task.loader_options(split)["batch_size"])
        drop_last = split == "train" and size > batch * world
        per_rank = SeededSampler(size, world_size=world, batch_size=batch, drop_last=drop_last).per_rank()
        splits[split] = {"images": size, "batch_per_rank": batch, "images_per_rank": per_rank,
                         "steps_per_epoch": math.ceil(per_rank / batch)}
    train = splits["train"]
    steps = min(train["steps_per_epoch"], planned.limit_train_batches or train["steps_per_epoch"])
    plan = {
        "processes": world,
        "accelerator": planned.accelerator,
        "precision": planned.precision,
        "splits": splits,
        "train_steps_per_epoch_per_rank": steps,
        "effective_batch": train["batch_per_rank"] * world,
        "total_steps": min(steps * planned.max_epochs, planned.max_steps or steps * planned.max_epochs),
        "members": engine.model_summary,
    }
    fabric = engine.fabric
    console.model_table(fabric, engine.model_summary)
    lines = [f"dry run of {planned.name or 'run'}: {world} process(es) on {planned.accelerator}, precision {planned.precision}"]
    for split, s in splits.items():
        lines.append(f"  {split:5s}: {s['images']} images, {s['images_per_rank']} per rank, batch {s['batch_per_rank']} "
                     f"per rank, {s['steps_per_epoch']} steps per epoch")
    lines.append(f"  training: {steps} steps per epoch on each rank, effective batch {plan['effective_batch']} "
                 f"({train['batch_per_rank']} x {world}), {plan['total_steps']} steps in all")
    lines.append("  data and models set up on this machine's CPU; nothing was trained or written")
    console.info(fabric, "\n".join(lines))
    return plan
