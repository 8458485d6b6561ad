"""Test a plugin the way the engine will run it, with public API only.

An outside author's pytest needs three things: a real (tiny) cohort that trains a few steps with
the plugin, the per-step losses the engine logged, and fixed records on which a loss can be
checked against stored numbers. This module gives exactly those::

    from collab_distill.testing import tiny_fit

    def test_my_rule_trains(tmp_path):
        run = tiny_fit([MyRule(strength=0.5)], root_dir=tmp_path, steps=4)
        assert run.results["status"] in ("finished", "stopped")
        assert all(math.isfinite(step["loss"]) for step in run.losses)
        assert "xxs/my_term" in run.losses[-1]

The cohort trains on scikit-learn's bundled digits (real 8x8 images, no download): two small
ResNet students (``xxs``, ``xs``) and, unless ``teacher=None``, a teacher trained in the run with
cross-entropy for ``teacher_epochs`` epochs. Everything runs on the CPU in seconds.

Only collab-distill's own always-on plugin (``defaults``) runs beside yours by default, so a test
gives the same numbers whatever else is installed in the environment; ``always_on="installed"``
also loads every always-on plugin other packages install (what ``collab-distill fit`` does).
"""

from __future__ import annotations

import importlib.metadata
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import torch
from torch import Tensor

from collab_distill.config import Cohort, Teacher, TrainerConfig
from collab_distill.engine import Engine
from collab_distill.hookspecs import hookimpl
from collab_distill.meta import BilevelConfig
from collab_distill.optim import Constant, sgd
from collab_distill.plugin_manager import GROUP
from collab_distill.records import Knowledge

__all__ = ["StepRecorder", "TinyFit", "tiny_engine", "tiny_fit", "make_records", "outside_entry_points"]

_OWN_DISTRIBUTION = "collab-distill"


def outside_entry_points() -> list[str]:
    """The names of the ``collab_distill`` entry points that packages other than collab-distill
    install, read from their metadata without importing them (a broken package stays harmless).
    These are what :func:`tiny_engine` leaves out unless ``always_on="installed"``."""
    own: set[str] = set()
    outside: set[str] = set()
    for ep in importlib.metadata.entry_points(group=GROUP):
        dist = getattr(ep, "dist", None)
        name = re.sub(r"[-_.]+", "-", dist.name).lower() if dist is not None else None
        mine = name == _OWN_DISTRIBUTION if name is not None else ep.value.startswith("collab_distill.")
        (own if mine else outside).add(ep.name)
    return sorted(outside - own)  # a name both declare cannot be told apart: it stays


class StepRecorder:
    """A plugin that keeps every training step's losses as floats (``losses``) and every meta
    step's ``(step, meta_loss, grad_norm)`` (``meta_steps``)."""

    def __init__(self) -> None:
        self.losses: list[dict[str, float]] = []
        self.meta_steps: list[tuple[int, float, float]] = []

    @hookimpl
    def collab_distill_train_step_end(self, step: int, losses: Mapping[str, Any]) -> None:
        self.losses.append({k: float(v) for k, v in losses.items()})

    @hookimpl
    def collab_distill_meta_step_end(self, step: int, meta_loss: Any, grad_norm: Any) -> None:
        self.meta_steps.append((step, float(meta_loss), float(grad_norm)))  # a host sync: fine in tests


@dataclass
class TinyFit:
    """What :func:`tiny_fit` returns.

    Attributes:
        engine: the engine after the fit (its ``students``, ``plugin_modules``, ``meta_modules``).
        results: what the fit returned (``status`` is ``stopped`` when ``steps`` ended it early).
        losses: one ``{name: value}`` per training step, every term logged (logging every step).
        meta_steps: ``(step, meta loss, meta grad norm)`` of every bilevel step.
        run_dir: the run folder (checkpoint, logs, results.json, your plugin's files).
    """

    engine: Engine
    results: dict[str, Any]
    losses: list[dict[str, float]] = field(default_factory=list)
    meta_steps: list[tuple[int, float, float]] = field(default_factory=list)
    run_dir: Optional[Path] = None


def tiny_engine(
    plugins: Sequence[Any],
    *,
    root_dir: str | Path,
    students: Sequence[str] = ("xxs", "xs"),
    teacher: Optional[str] = "s",
    teacher_epochs: int = 1,
    multi_exit: bool = False,
    epochs: int = 1,
    steps: Optional[int] = None,
    temperature: float = 2.0,
    warmup_epochs: int = 0,
    meta: Optional[BilevelConfig] = None,
    batch_size: int = 32,
    subset: Optional[int] = 400,
    seed: int = 0,
    always_on: Literal["builtin", "installed"] = "builtin",
    disable_plugins: Sequence[str] = (),
    **trainer: Any,
) -> Engine:
    """An :class:`~collab_distill.engine.Engine` on digits with ``plugins`` configured.

    Args:
        plugins: your plugin instances (add a ``FixedLossWeights`` if the rule needs beta > 0).
        root_dir: where the run folder goes (pytest's ``tmp_path``).
        students: sizes of the ResNet10 family (``xxs`` ... ``l``); each student is named by its size.
        teacher: the size of the teacher (the member named ``teacher``), or ``None`` for a cohort
            without teacher.
        teacher_epochs: epochs of cross-entropy training of the teacher inside the run.
        multi_exit: wrap every student in ``MultiExit`` (early exits after each stage).
        epochs, steps: ``max_epochs`` and ``max_steps`` of the fit.
        meta: the bilevel step's settings (for plugins with meta modules); default every 2 steps.
        subset: use this many digits images in all (``None``: all 1,797).
        always_on: which always-on plugins (entry points naming a module) run beside ``plugins``:
            ``"builtin"`` (the default): collab-distill's own only (``defaults``), so the test does
            not change when another package is installed; ``"installed"``: every installed one,
            as ``collab-distill fit`` runs them (e.g. to test an always-on plugin of your package
            through its entry point).
        disable_plugins: always-on plugins to leave out as well (``--disable_plugins``).
        trainer: any other :class:`~collab_distill.config.TrainerConfig` field.
    """
    from collab_distill.tasks.classification import Digits, ImageClassification, MultiExit, ResNet

    def factory(size: str) -> Any:
        return MultiExit(ResNet(size)) if multi_exit else ResNet(size)

    cohort = Cohort(
        students={size: factory(size) for size in students},
        teachers={"teacher": Teacher(ResNet(teacher), train_epochs=teacher_epochs)} if teacher is not None else {},
    )
    options: dict[str, Any] = dict(
        max_epochs=epochs, max_steps=steps, temperature=temperature, warmup_epochs=warmup_epochs, accelerator="cpu",
        root_dir=str(root_dir), name="tiny", progress_bar=False, log_every_n_steps=1, loggers=["csv"],
    )
    options.update(trainer)
    if always_on not in ("builtin", "installed"):
        raise ValueError(f"tiny_engine: always_on={always_on!r} must be 'builtin' or 'installed'")
    disabled = list(disable_plugins) + (outside_entry_points() if always_on == "builtin" else [])
    return Engine(
        task=ImageClassification(Digits(batch_size=batch_size, subset=subset)),
        cohort=cohort,
        trainer=TrainerConfig(**options),
        optimizer=sgd,
        schedule=Constant(),
        meta=meta or BilevelConfig(every_n_steps=2),
        plugins=list(plugins),
        disable_plugins=list(dict.fromkeys(disabled)),
        seed=seed,
    )


def tiny_fit(plugins: Sequence[Any], *, root_dir: str | Path, steps: Optional[int] = 4, **options: Any) -> TinyFit:
    """Fit a tiny digits cohort with ``plugins`` for ``steps`` steps (or ``epochs``, see
    :func:`tiny_engine`, which takes the other ``options``: ``students``, ``teacher``,
    ``always_on``, ...) and return the engine, the results and every step's losses.

    Only the built-in always-on plugin runs beside ``plugins`` unless ``always_on="installed"``."""
    recorder = StepRecorder()
    engine = tiny_engine([*plugins, recorder], root_dir=root_dir, steps=steps, **options)
    results = engine.fit()
    return TinyFit(engine, results, recorder.losses, recorder.meta_steps, engine.run_dir)


def make_records(
    students: Sequence[str] = ("student",),
    *,
    num_images: int = 4,
    num_classes: int = 5,
    features: Optional[Mapping[str, Sequence[int]]] = None,
    seed: int = 0,
    requires_grad: bool = True,
) -> dict[str, Knowledge]:
    """Fixed, seeded classification records for golden-value tests of a loss.

    Each record has random logits (``requires_grad`` so a test can check gradients), labels
    ``arange(num_images) % num_classes`` and, for every ``{name: shape}`` in ``features``, a random
    feature tensor ``[num_images, *shape]``. The same ``seed`` always gives the same numbers.
    """
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_images) % num_classes
    records: dict[str, Knowledge] = {}
    for name in students:
        logits = torch.randn(num_images, num_classes, generator=generator).requires_grad_(requires_grad)
        maps: dict[str, Tensor] = {
            key: torch.randn(num_images, *shape, generator=generator).requires_grad_(requires_grad)
            for key, shape in (features or {}).items()
        }
        records[name] = Knowledge.for_images(logits, labels, **maps)
    return records
