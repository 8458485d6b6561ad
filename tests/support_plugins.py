"""Small plugins used by the tests (importable by ``class_path`` with ``tests/`` on PYTHONPATH).

They are real plugins on the public hooks, written the way a third party would write them.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
from collections.abc import Mapping
from typing import Any, Optional

import torch
from lightning_fabric.loggers import Logger
from torch import nn

from collab_distill import ConfigError, Knowledge, LossWeights, MetaModule, Plugin, SoftTarget, hookimpl


class LearnedImageWeights(Plugin):
    """A meta-learned per-image alpha/beta (a linear layer on the flattened image, sigmoid)."""

    def __init__(self, in_features: int = 64, lr: float = 0.05) -> None:
        self.in_features = in_features
        self.lr = lr
        self.net = nn.Linear(in_features, 2)
        nn.init.zeros_(self.net.weight)
        nn.init.zeros_(self.net.bias)

    @hookimpl
    def collab_distill_meta_modules(self, engine: Any) -> list[MetaModule]:
        return [MetaModule("image_weights", self.net, lambda p: torch.optim.SGD(p, lr=self.lr, momentum=0.9))]

    @hookimpl
    def collab_distill_loss_weights(self, engine: Any, batch: Any, records: Mapping[str, Knowledge]) -> dict[str, LossWeights]:
        net = engine.meta_modules["image_weights"]
        x = batch["inputs"]
        if x.dim() == 5:
            x = x[:, 0]
        w = 2 * torch.sigmoid(net(x.flatten(1)))
        zero = torch.zeros_like(w[:, 0])
        return {name: LossWeights(w[:, 0], w[:, 1], zero) for name in records}


class ConstantConsensus(Plugin):
    """A consensus target that is the mean of the students' (detached) distributions."""

    @hookimpl
    def collab_distill_consensus_targets(self, records: Mapping[str, Knowledge], temperature: float) -> dict[str, SoftTarget]:
        probs = torch.stack([SoftTarget.from_logits(r.logits, temperature).probs for r in records.values()]).mean(0)
        return {name: SoftTarget(probs) for name in records}


class WeightChecksums(Plugin):
    """At fit end every rank writes a checksum of each student and meta module."""

    @hookimpl
    def collab_distill_fit_end(self, engine: Any) -> None:
        def digest(module: nn.Module) -> str:
            h = hashlib.sha256()
            for key, value in sorted(module.state_dict().items()):
                h.update(key.encode())
                h.update(value.detach().cpu().contiguous().numpy().tobytes())
            return h.hexdigest()

        from collab_distill import unwrap

        sums = {name: digest(unwrap(m)) for name, m in engine.students.items()}
        sums.update({f"meta:{name}": digest(m) for name, m in engine.meta_modules.items()})
        sums.update({f"plugin:{s}/{k}": digest(unwrap(m)) for s, mods in engine.plugin_modules.items() for k, m in mods.items()})
        plugin_state: dict[str, Any] = {}  # e.g. KDCL-General's ensemble weights, computed per rank
        engine.hook.collab_distill_save_state(engine=engine, state=plugin_state)
        sums["plugins"] = json.dumps(plugin_state, default=str, sort_keys=True)
        sums["world_size"] = engine.fabric.world_size
        path = engine.run_dir / f"checksums_rank{engine.fabric.global_rank}.json"
        path.write_text(json.dumps(sums))


class KillAtStep(Plugin):
    """Kills its own process (SIGKILL, no cleanup) right after training step ``step``."""

    def __init__(self, step: int) -> None:
        if step < 1:
            raise ConfigError("KillAtStep.step must be >= 1")
        self.step = step

    @hookimpl
    def collab_distill_train_step_end(self, step: int) -> None:
        if step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class CountingPlugin(Plugin):
    """Counts lifecycle events and round-trips its counter through checkpoints."""

    def __init__(self) -> None:
        self.events: dict[str, int] = {}

    def _count(self, name: str) -> None:
        self.events[name] = self.events.get(name, 0) + 1

    @hookimpl
    def collab_distill_fit_start(self) -> None:
        self._count("fit_start")

    @hookimpl
    def collab_distill_train_step_end(self) -> None:
        self._count("train_step_end")

    @hookimpl
    def collab_distill_epoch_end(self) -> None:
        self._count("epoch_end")

    @hookimpl
    def collab_distill_evaluation_end(self, split: str) -> None:
        self._count(f"evaluation_end:{split}")

    @hookimpl
    def collab_distill_fit_end(self) -> None:
        self._count("fit_end")

    @hookimpl
    def collab_distill_save_state(self, state: dict) -> None:
        state["counting"] = dict(self.events)

    @hookimpl
    def collab_distill_load_state(self, state: Mapping) -> None:
        self.events = dict(state.get("counting", {}))


class MemoryLogger(Logger):
    """A Fabric logger that keeps every logged row in memory (trainer.loggers by class_path)."""

    def __init__(self, tag: str = "memory") -> None:
        super().__init__()
        self.tag = tag
        self.rows: list[tuple[Optional[int], dict[str, float]]] = []
        self.finalized = False

    @property
    def name(self) -> str:
        return self.tag

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: Optional[int] = None) -> None:
        self.rows.append((step, dict(metrics)))

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def finalize(self, status: str) -> None:
        self.finalized = True


class FailingLossWeights(Plugin):
    """Reads a record that is not there: a bug inside a hook (the error must name this plugin)."""

    @hookimpl
    def collab_distill_loss_weights(self, records: Mapping[str, Knowledge]) -> dict[str, LossWeights]:
        teacher = records["teacher"]  # the bug: records holds the students' records only
        return {n: LossWeights.constant_weights(teacher.num_images, 1.0, 0.0, 0.0, teacher.logits.device) for n in records}


class MisspelledArgument(Plugin):
    """A hook implementation asking for an argument the hook does not offer (``enigne``)."""

    @hookimpl
    def collab_distill_loss_weights(self, enigne: Any, records: Mapping[str, Knowledge]) -> None:
        return None


class UndecoratedHooks(Plugin):
    """Hook-like methods the engine never calls: one lacks ``@hookimpl``, one is no hook at all."""

    def collab_distill_loss_weights(self, records: Mapping[str, Knowledge]) -> dict[str, LossWeights]:
        return {n: LossWeights.constant_weights(r.num_images, 0.5, 0.5, 0.0, r.logits.device) for n, r in records.items()}

    def collab_distill_epoch_ends(self, epoch: int) -> None:
        pass


class RoleRecorder(Plugin):
    """Records ``(engine.role, global rank, epoch)`` at every ``epoch_end`` it is called in."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, int, int]] = []

    @hookimpl
    def collab_distill_epoch_end(self, engine: Any, epoch: int) -> None:
        self.seen.append((engine.role, engine.fabric.global_rank, epoch))
