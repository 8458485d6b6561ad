"""Every extension point of collab-distill, in one place.

A plugin is any object (or module) with functions named like the hooks below and marked with
:data:`hookimpl`. Built-in methods are plugins on exactly these hooks, registered through the
same ``collab_distill`` entry-point group a third-party package uses.

Conventions (as in pytest):

* hooks are called with keyword arguments only; an implementation may accept any subset;
* *provider* hooks are ``firstresult``: the first non-``None`` answer wins. Built-in defaults
  are ``trylast`` and plugins configured by the user override them by answering at all;
* *collect* hooks return a list of every plugin's answer;
* *event* hooks return nothing.

``engine`` is the running :class:`~collab_distill.engine.Engine`: plugins reach the cohort
(``engine.students``, ``engine.teachers``, ``engine.meta_modules``), the task, the Fabric
object and the loop counters through it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

import pluggy

if TYPE_CHECKING:
    from torch import Tensor

    from collab_distill.engine import Engine
    from collab_distill.meta import MetaModule
    from collab_distill.records import Knowledge, LossWeights, SoftTarget

PROJECT = "collab_distill"

hookspec = pluggy.HookspecMarker(PROJECT)
#: decorate a plugin's hook implementations with this
hookimpl = pluggy.HookimplMarker(PROJECT)


# ---------------------------------------------------------------------------- providers


@hookspec(firstresult=True)
def collab_distill_loss_weights(
    engine: Engine, batch: Any, records: Mapping[str, Knowledge], teacher_records: Mapping[str, Knowledge], phase: str
) -> Mapping[str, LossWeights] | None:
    """How much each student listens to labels (alpha), soft target (beta) and consensus (gamma).

    Called once per training step (and once per lookahead of the bilevel step) after every
    member has produced its record.

    :param batch: the training batch as the task produced it (the images are in it).
    :param records: ``{student name: Knowledge}`` of this step, with graph.
    :param teacher_records: the frozen teachers' records (computed on first access).
    :param phase: ``"train"`` for the real step, ``"lookahead"`` inside the bilevel step.
    :return: ``{student name: LossWeights}`` with ``[B]`` tensors. Weights from a meta-learned
        module must keep their graph (the bilevel step differentiates through them). The first
        non-None answer wins; the built-in default is plain supervised training (1, 0, 0).
        Build fixed numbers with ``LossWeights.constant_weights`` so the engine can skip terms
        whose weight is exactly zero.
    """


@hookspec(firstresult=True)
def collab_distill_soft_targets(
    engine: Engine,
    batch: Any,
    records: Mapping[str, Knowledge],
    teacher_records: Mapping[str, Knowledge],
    temperature: float,
) -> Mapping[str, SoftTarget] | None:
    """The distillation target of each student (the beta term).

    Not called in a step where every student's beta is a constant zero (see
    ``LossWeights.constant``).

    :param records: the students' records of this step (with graph: detach what you use).
    :param teacher_records: the frozen teachers' records (no graph). Computed on first access,
        so a rule that does not look at them saves the teachers' forward pass.
    :return: ``{student name: SoftTarget}``; a student left out gets no beta term. The built-in
        default uses the teacher, or the mean of the teachers' distributions when there are several.
    """


@hookspec(firstresult=True)
def collab_distill_consensus_targets(
    engine: Engine,
    batch: Any,
    records: Mapping[str, Knowledge],
    teacher_records: Mapping[str, Knowledge],
    temperature: float,
) -> Mapping[str, SoftTarget] | None:
    """A target pooled from the cohort (the gamma term), e.g. PooledStudent or MinLogit.

    Not called in a step where every student's gamma is a constant zero.

    :return: ``{student name: SoftTarget}``, or ``None`` for no consensus term (the default).
    """


@hookspec(firstresult=True)
def collab_distill_meta_objective(
    engine: Engine, batch: Any, records: Mapping[str, Knowledge]
) -> Tensor | None:
    """The scalar the meta-learned modules minimise, from records on a held-out meta batch.

    ``records`` come from the looked-ahead students (their parameters depend on the meta
    modules). The built-in default is the sum over students of their mean supervised loss
    (MC-Distil's eq. 6).
    """


# ---------------------------------------------------------------------------- collectors


@hookspec
def collab_distill_meta_modules(engine: Engine) -> list[MetaModule] | None:
    """Meta-learned modules this plugin owns (a C-Net, a label generator, ...).

    Called once at fit start, after the students exist. The engine moves each module to the
    device, wraps it for DDP, builds its optimizer, checkpoints it, and updates it only in the
    bilevel step. Afterwards the plugin reads ``engine.meta_modules[name]`` to call it.
    """


@hookspec
def collab_distill_auxiliary_losses(
    engine: Engine,
    batch: Any,
    records: Mapping[str, Knowledge],
    teacher_records: Mapping[str, Knowledge],
    weights: Mapping[str, LossWeights],
    phase: str,
) -> Mapping[str, Tensor] | None:
    """Extra loss terms added to the cohort loss (feature or box-regression distillation, the
    early exits of a multi-exit student).

    :param phase: ``"train"`` for the real step, ``"lookahead"`` inside the bilevel step; a term
        built by a meta module keeps its graph only in the lookahead (the real step must leave
        no gradient on it).
    :return: ``{term name: scalar tensor}``. Terms are logged under their names and summed.
    """


# ---------------------------------------------------------------------------- events


@hookspec
def collab_distill_configure(engine: Engine) -> None:
    """The engine and its plugins exist; validate configuration here (raise ConfigError)."""


@hookspec
def collab_distill_fit_start(engine: Engine) -> None:
    """Models, optimizers and data loaders are set up; training is about to begin."""


@hookspec
def collab_distill_train_step_end(engine: Engine, step: int, losses: Mapping[str, float]) -> None:
    """A training step finished.

    ``losses`` maps names to numbers or detached 0-dim tensors: always ``loss`` and
    ``<student>/loss``, and on logging steps (every ``trainer.log_every_n_steps``) also
    ``<student>/supervised``, ``/distill``, ``/consensus``, ``/alpha``, ``/beta``, ``/gamma``. Call ``float()`` only when
    needed (it synchronises with the GPU).
    """


@hookspec
def collab_distill_meta_step_end(engine: Engine, step: int, meta_loss: float, grad_norm: float) -> None:
    """A bilevel meta step finished.

    :param meta_loss: the meta objective after the lookahead.
    :param grad_norm: the norm of the meta modules' gradient (before any ``meta.grad_clip``); a
        norm that stays zero means the meta objective does not reach the modules.
    """


@hookspec
def collab_distill_epoch_end(engine: Engine, epoch: int, metrics: Mapping[str, float]) -> None:
    """An epoch (training and validation) finished."""


@hookspec
def collab_distill_evaluation_end(engine: Engine, split: str, metrics: Mapping[str, Mapping[str, float]]) -> None:
    """An evaluation of every student on ``split`` finished; ``metrics[student][name]``."""


@hookspec
def collab_distill_fit_end(engine: Engine, results: Mapping[str, Any]) -> None:
    """Training finished; ``results`` is what goes into ``results.json``."""


@hookspec
def collab_distill_save_state(engine: Engine, state: dict[str, Any]) -> None:
    """A checkpoint is being written: put this plugin's state under a key of its own."""


@hookspec
def collab_distill_load_state(engine: Engine, state: Mapping[str, Any]) -> None:
    """A checkpoint is being restored: take this plugin's state back from its key."""
