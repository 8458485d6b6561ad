"""The typed configuration sections of a run (what ``--print_config`` shows)."""

from __future__ import annotations

import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any, Literal, Optional, Union, get_args

import torch
from lightning_fabric.loggers import Logger

from collab_distill.cluster import check_num_nodes
from collab_distill.path_limits import check_run_path
from collab_distill.task import ConfigError, ModelFactory

__all__ = [
    "Teacher", "Cohort", "TrainerConfig", "check_accelerator", "fabric_refused", "check_writable_folder", "check_optimizer",
    "check_compile_backend",
]


@dataclass
class Teacher:
    """A frozen teacher.

    Args:
        model: the architecture (``class_path`` of a model factory).
        checkpoint: a state dict (or a collab-distill checkpoint / export) to load. Required
            unless ``train_epochs`` > 0 or the model factory loads trained weights itself.
        train_epochs: if no checkpoint is given, first train the teacher with plain
            cross-entropy for this many epochs, as a run of its own inside the run folder
            (with a checkpoint as well it is refused: a teacher is either loaded or trained).
        cache_dir: keep a teacher trained in the run here and reuse it in later runs whose
            teacher training would be the same (same data, teacher model, epochs, optimizer,
            schedule, seed, precision and devices; the file name carries a hash of them), so that
            comparing methods trains the teacher once. ``None``: train it in every run.
    """

    model: ModelFactory
    checkpoint: Optional[str] = None
    train_epochs: int = 0
    cache_dir: Optional[str] = None


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
            if teacher.checkpoint is not None and teacher.train_epochs > 0:  # training would be skipped silently
                raise ConfigError(
                    f"cohort.teachers.{name}: both a `checkpoint` ({teacher.checkpoint}) and `train_epochs: "
                    f"{teacher.train_epochs}` are given, but a teacher is either loaded or trained here; remove "
                    "train_epochs to use the checkpoint, or the checkpoint to train it"
                )
            if teacher.cache_dir is not None and teacher.train_epochs > 0:
                check_writable_folder(teacher.cache_dir, f"cohort.teachers.{name}.cache_dir")
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
        if self.gradient_clip is not None and not self.gradient_clip > 0:  # a negative norm reverses the gradients
            raise ConfigError(f"trainer.gradient_clip={self.gradient_clip!r} must be > 0 (the largest gradient norm) "
                              "or null (no clipping)")
        if self.name is not None:
            parts = PurePath(self.name).parts
            if not self.name.strip() or PurePath(self.name).is_absolute() or ".." in parts or "\\" in self.name:
                raise ConfigError(
                    f"trainer.name={self.name!r} must name a folder inside trainer.root_dir (no absolute path, "
                    "no '..'); put the run elsewhere with --trainer.root_dir")
        for key in ("max_steps", "checkpoint_every_n_steps", "limit_train_batches", "limit_eval_batches"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"trainer.{key}={value!r} must be >= 1 or null")
        precisions = _fabric_precisions()
        if precisions and str(self.precision) not in precisions:
            raise ConfigError(
                f"trainer.precision={self.precision!r} is not a precision Fabric knows; choose one of "
                f"{', '.join(precisions)}"
            )
        if self.compile is not None:
            check_compile_backend(self.compile)
        check_run_path(str(self.root_dir), self.name)


def _compile_backends() -> tuple[list[str], list[str]]:
    """``(accepted, shown)``: every name ``torch.compile(backend=...)`` accepts, and the ones a
    message offers, the usual first. ``aot_eager`` and ``eager`` are tagged "debug" and left out of
    ``list_backends()`` by default, hence ``exclude_tags=()``."""
    try:
        accepted = torch.compiler.list_backends(exclude_tags=())
        default = torch.compiler.list_backends()
    except Exception:  # noqa: BLE001 - no dynamo on this platform: torch.compile itself will say so
        return [], []
    usual = [n for n in ("inductor", "aot_eager", "eager", "cudagraphs") if n in accepted]
    return accepted, usual + [n for n in default if n not in usual]


def check_compile_backend(backend: str) -> None:
    """``trainer.compile`` names a backend torch knows: refused with the config, not by
    ``torch.compile`` once the run folder exists."""
    import difflib

    accepted, shown = _compile_backends()
    if accepted and backend not in accepted:
        close = difflib.get_close_matches(backend, accepted, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(
            f"trainer.compile={backend!r} is not a torch.compile backend{hint}; choose one of {', '.join(shown)} "
            "(or another name torch.compiler.list_backends(exclude_tags=()) lists), or null to run eagerly"
        )


def _fabric_precisions() -> tuple[str, ...]:
    """The precision names the installed Fabric accepts, most used first, read from the Literal
    types of its precision module (private: when they move, nothing is checked here and Fabric
    itself rejects a bad name, see :func:`fabric_refused`)."""
    try:
        from lightning_fabric.plugins.precision import precision as module
    except ImportError:  # pragma: no cover - a Fabric that moved the module
        return ()
    literals = (getattr(module, alias, None) for alias in ("_PRECISION_INPUT_STR", "_PRECISION_INPUT_STR_ALIAS"))
    names = [str(v) for literal in literals for v in get_args(literal)]
    common = ["32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true"]
    return tuple(sorted(dict.fromkeys(names), key=lambda n: (common.index(n) if n in common else len(common), names.index(n))))


def check_accelerator(trainer: TrainerConfig) -> None:
    """``trainer.accelerator`` names a device this machine has (Fabric's own error for a missing
    GPU, "No supported gpu backend found!", names no config key), and that a multi-node run was
    launched as one."""
    check_num_nodes(trainer.num_nodes)
    accelerator = str(trainer.accelerator)
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if (accelerator in ("gpu", "cuda") and not cuda and not (accelerator == "gpu" and mps)) or (accelerator == "mps" and not mps):
        kind = "Apple GPU (MPS)" if accelerator == "mps" else "GPU (torch.cuda.is_available() is False)"
        raise ConfigError(
            f"trainer.accelerator={accelerator}: this machine has no {kind}; use --trainer.accelerator cpu or auto"
        )
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not cuda and not mps)
    if on_cpu and str(trainer.precision) in ("16-mixed", "16"):
        # Fabric would quietly run bf16 instead, and config.yaml would record what did not run
        raise ConfigError(
            f"trainer.precision={trainer.precision} needs a GPU; this run is on the CPU: use bf16-mixed or 32-true"
        )


def fabric_refused(trainer: TrainerConfig, err: Exception) -> ConfigError:
    """The error for settings Fabric refuses at construction (a bare ValueError, TypeError,
    RuntimeError or ImportError of a missing backend), naming the ``trainer`` fields."""
    return ConfigError(
        f"trainer: Fabric refuses accelerator={trainer.accelerator!r}, devices={trainer.devices!r}, "
        f"num_nodes={trainer.num_nodes!r}, strategy={trainer.strategy!r}, precision={trainer.precision!r}: "
        f"{type(err).__name__}: {err}. Fix trainer.accelerator (cpu, gpu, cuda, mps or auto), trainer.devices, "
        "trainer.num_nodes, trainer.strategy or trainer.precision."
    )


def check_writable_folder(path: str, field: str) -> None:
    """``path`` (which need not exist yet) can be created and written to: its nearest existing
    ancestor is a folder in which a file can be created and removed.

    Nothing is created: the probe is a temporary file in that ancestor, removed at once. Permission
    bits are not read, because they do not tell (root ignores them, a read-only mount ignores them
    the other way)."""
    target = Path(path).expanduser().absolute()
    existing = target
    while not existing.exists() and existing != existing.parent:  # exists() is False below a file too
        existing = existing.parent
    fix = f"give a folder you can write to (--{field} DIR)"
    if not existing.is_dir():
        raise ConfigError(
            f"{field}={str(path)!r}: {str(existing)!r} is a file, not a folder, so nothing can be written "
            f"below it; {fix}"
        )
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".collab-distill-probe-"):
            pass
    except OSError as err:
        raise ConfigError(
            f"{field}={str(path)!r}: cannot create files in {str(existing)!r} ({err.strerror or err}); {fix} "
            "or make that folder writable"
        ) from None


def check_optimizer(
    factory: Callable[[list[torch.nn.Parameter]], Any], what: str, device: Any = None, key: Optional[str] = None
) -> None:
    """Build the optimizer ``factory`` makes once, for a throwaway parameter on ``device``, so that
    a bad setting (a negative learning rate, say) stops the run at set-up with one message, not
    torch's exception once training (or in-run teacher training) has started.

    ``what`` names the optimizer in the message; ``key`` is its config key (``optimizer``), whose
    ``init_args`` the fix names; without one the fix points at the settings of a plugin."""
    try:
        probe = torch.nn.Parameter(torch.zeros(1, device=device))
        optimizer = factory([probe])
        _check_step(optimizer, what, key)
        probe.grad = torch.zeros_like(probe)
        optimizer.step()  # a setting torch only reads in step() (an lr beyond float32) fails here, not in training
    except ConfigError:
        raise
    except Exception as err:
        target = _partial_target(factory)
        described = "its optimizer"
        if target is not None:
            public = getattr(torch.optim, target.__name__, None) is target
            described = f"torch.optim.{target.__name__}" if public else f"{target.__module__}.{target.__qualname__}"
        keywords = getattr(factory, "keywords", None) or {}
        names = [k for k in keywords if re.search(rf"\b{re.escape(k)}\b", str(err))]
        huge = [f"{k}={v!r}" for k, v in keywords.items() if isinstance(v, (int, float)) and abs(v) > _FLOAT32_MAX]
        if "overflow" in str(err) and huge:  # torch names no argument: the numbers float32 cannot hold
            names += [h.split("=")[0] for h in huge]
            err = RuntimeError(f"{err} ({', '.join(huge)} is beyond float32's largest number, {_FLOAT32_MAX:.3g})")
        names += [name for phrase, name in _OPTIMIZER_PHRASES.items() if phrase in str(err).lower() and name not in names]
        if key is not None:
            fix = ", ".join(f"{key}.init_args.{n}" for n in names) or f"{key}.init_args"
        else:
            settings = ", ".join(names) or "of the optimizer"
            fix = f"the setting{'s' if len(names) > 1 else ''} {settings} of the plugin that declares it"
        raise ConfigError(f"{what}: {described} rejects its settings: {type(err).__name__}: {err}. Fix {fix}") from None


_FLOAT32_MAX = torch.finfo(torch.float32).max


def _check_step(optimizer: Any, what: str, key: Optional[str]) -> None:
    """The training step calls ``optimizer.step()`` without arguments; an optimizer whose step
    needs a closure (L-BFGS re-evaluates the loss) cannot be driven by it."""
    import inspect

    closure = inspect.signature(optimizer.step).parameters.get("closure")
    if closure is not None and closure.default is inspect.Parameter.empty:
        where = key or "the plugin's optimizer"
        raise ConfigError(
            f"{what}: {type(optimizer).__name__}.step() needs a closure that re-evaluates the loss, which the "
            f"training step (one forward and backward per batch) does not give; set {where} to an optimizer "
            "whose step() takes no arguments (torch.optim.SGD, Adam, AdamW, ...)"
        )


#: torch.optim's messages name some arguments in words
_OPTIMIZER_PHRASES = {"learning rate": "lr", "epsilon": "eps", "beta parameter": "betas"}


def _partial_target(factory: Any) -> Optional[type]:
    """The class a ``functools.partial`` factory (what jsonargparse builds from ``class_path`` and
    ``init_args``) finally instantiates, its last positional argument that is a class; ``None``
    for another callable (a function, a plugin's lambda)."""
    args = getattr(factory, "args", ())
    return next((a for a in reversed(args) if isinstance(a, type)), None)
