"""The typed configuration sections of a run (what ``--print_config`` shows)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from lightning_fabric.loggers import Logger

from collab_distill.task import ConfigError, ModelFactory

__all__ = ["Teacher", "Cohort", "TrainerConfig"]


@dataclass
class Teacher:
    """A frozen teacher.

    Args:
        model: the architecture (``class_path`` of a model factory).
        checkpoint: a state dict (or a collab-distill checkpoint / export) to load. Required
            unless ``train_epochs`` > 0 or the model factory loads trained weights itself.
        train_epochs: if no checkpoint is given, first train the teacher with plain
            cross-entropy for this many epochs, as a run of its own inside the run folder.
    """

    model: ModelFactory
    checkpoint: Optional[str] = None
    train_epochs: int = 0


class Cohort:
    """The students that learn together, and the frozen teachers they may learn from."""

    def __init__(
        self,
        students: dict[str, ModelFactory],
        teachers: Optional[dict[str, Teacher]] = None,
        student_checkpoints: Optional[dict[str, str]] = None,
    ) -> None:
        """
        Args:
            students: ``{name: model factory}``; names appear in logs, metrics and exports.
            teachers: ``{name: Teacher}``; empty for online methods without a teacher.
            student_checkpoints: ``{student name: path}`` warm-start weights for students.
        """
        if not students:
            raise ConfigError("cohort.students is empty: name at least one student, e.g. `s: {class_path: ResNet}`")
        teachers = teachers or {}
        student_checkpoints = student_checkpoints or {}
        clash = set(students) & set(teachers)
        if clash:
            raise ConfigError(f"cohort: {sorted(clash)} named both as student and as teacher; use distinct names")
        for name in list(students) + list(teachers):
            if not name.replace("_", "").replace("-", "").isalnum():
                raise ConfigError(f"cohort: member name {name!r} must be letters, digits, '-' or '_'")
        unknown = set(student_checkpoints) - set(students)
        if unknown:
            raise ConfigError(
                f"cohort.student_checkpoints names {sorted(unknown)}, which are not students ({sorted(students)})"
            )
        for name, teacher in teachers.items():
            if teacher.checkpoint is None and teacher.train_epochs <= 0 and not teacher.model.provides_trained_weights:
                raise ConfigError(
                    f"cohort.teachers.{name}: give a `checkpoint` to load, `train_epochs` > 0 to train it first, "
                    "or a model factory that loads trained weights"
                )
        self.students = students
        self.teachers = teachers
        self.student_checkpoints = student_checkpoints


@dataclass
class TrainerConfig:
    """The loop, the hardware and the run folder.

    Args:
        max_epochs: epochs of cohort training.
        max_steps: stop after this many optimizer steps in total (``None``: no limit).
        warmup_epochs: the first epochs train a student with its supervised loss only
            (alpha=1, beta=gamma=0); one number for every student or ``{student: epochs}``.
            Meta steps start once every student has finished its warm-up.
        temperature: distillation temperature tau of both KL terms.
        accelerator: ``cpu``, ``gpu``, ``cuda``, ``mps`` or ``auto``.
        devices: number of devices per node (or ``auto``).
        num_nodes: number of nodes.
        strategy: ``auto``, ``ddp``, ``ddp_spawn``, ...
        precision: Fabric precision (``32-true``, ``bf16-mixed``, ``16-mixed``).
        root_dir: runs are written to ``root_dir/name/version_N``.
        name: the experiment name (default: the stem of the last --config file, e.g. ``method`` for method.yaml).
        checkpoint_every_n_epochs: write ``last.ckpt`` at the end of every this many epochs.
        checkpoint_every_n_steps: also write ``last.ckpt`` every this many steps (mid-epoch).
        log_every_n_steps: how often step losses are logged.
        val_every_n_epochs: evaluate the val split every this many epochs (and at the end).
        limit_train_batches: at most this many training batches per epoch (quick runs).
        limit_eval_batches: at most this many batches per evaluation.
        gradient_clip: clip each student's gradient norm (``None``: off).
        detect_nonfinite: stop with a clear error when a loss becomes NaN/inf.
        progress_bar: show a progress bar (rank 0 only).
        loggers: where step and epoch metrics go: ``csv`` and ``tensorboard`` (under the run
            folder's ``logs/``) and/or any ``lightning_fabric.loggers.Logger`` by ``class_path``
            (W&B, MLflow, ...).
        compile: ``torch.compile`` the students', teachers' and meta modules' forward passes with
            this backend (``inductor`` on GPUs; ``aot_eager`` to check a model compiles); ``None``:
            eager. The bilevel lookahead runs the students uncompiled (double backward).
        channels_last: store students' and teachers' weights in channels-last
            memory format, faster for convolutions under mixed precision on GPUs.
    """

    max_epochs: int = 10
    max_steps: Optional[int] = None
    warmup_epochs: Union[int, dict[str, int]] = 0
    temperature: float = 4.0
    accelerator: str = "auto"
    devices: Union[int, str] = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "32-true"
    root_dir: str = "runs"
    name: Optional[str] = None
    checkpoint_every_n_epochs: int = 1
    checkpoint_every_n_steps: Optional[int] = None
    log_every_n_steps: int = 10
    val_every_n_epochs: int = 1
    limit_train_batches: Optional[int] = None
    limit_eval_batches: Optional[int] = None
    gradient_clip: Optional[float] = None
    detect_nonfinite: bool = True
    progress_bar: bool = True
    loggers: list[Union[Literal["csv", "tensorboard"], Logger]] = field(default_factory=lambda: ["csv", "tensorboard"])
    compile: Optional[str] = None
    channels_last: bool = False

    def __post_init__(self) -> None:
        checks = {
            "max_epochs": (self.max_epochs >= 1, ">= 1"),
            "warmup_epochs": (
                all(w >= 0 for w in (self.warmup_epochs.values() if isinstance(self.warmup_epochs, dict)
                                     else [self.warmup_epochs])),
                ">= 0 (one number, or {student: epochs})",
            ),
            "temperature": (self.temperature > 0, "> 0"),
            "num_nodes": (self.num_nodes >= 1, ">= 1"),
            "checkpoint_every_n_epochs": (self.checkpoint_every_n_epochs >= 1, ">= 1"),
            "log_every_n_steps": (self.log_every_n_steps >= 1, ">= 1"),
            "val_every_n_epochs": (self.val_every_n_epochs >= 1, ">= 1"),
        }
        for key, (ok, rule) in checks.items():
            if not ok:
                raise ConfigError(f"trainer.{key}={getattr(self, key)!r} is out of range: it must be {rule}")
        for key in ("max_steps", "checkpoint_every_n_steps", "limit_train_batches", "limit_eval_batches"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"trainer.{key}={value!r} must be >= 1 or null")
