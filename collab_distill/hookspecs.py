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

``engine`` is the running engine, typed :class:`~collab_distill.engine_view.EngineView`: that
protocol lists everything a plugin may read or call (the cohort, the task, the Fabric object,
loop counters, captured feature shapes, plugin-owned student modules).

Which answer wins: a *provider* hook is answered by the most recently registered plugin that
returns something other than ``None``. Configured plugins (``plugins:`` in the YAML) are
registered after the always-on ones, and among them the last one listed is asked first; the
built-in defaults answer last (``trylast``). Two configured plugins that both answer the same
provider hook therefore do not combine: the later one in the list wins, silently for the
other, so a plugin that only sometimes answers should return ``None`` otherwise.

Order of hook calls
-------------------

Set-up (``collab-distill fit`` / ``Engine.fit``), once::

    configure -> declare_loss_terms -> feature_requests -> (features probed on two real images)
      -> student_modules -> meta_modules -> [teachers pre-trained as runs of their own]
      -> load_state (on --resume) -> fit_start

One training step, in this order::

    shared_context (task) -> teachers' records (only if the previous step used them)
    if a meta step is due (from the step counter, so every DDP rank agrees):
        lookahead on the training batch: students' records (with features)
            -> loss_weights(phase="lookahead") -> soft_targets* -> consensus_targets*
            -> loss_terms(phase="lookahead") -> auxiliary_losses(phase="lookahead")
        meta batch, looked-ahead students' records -> meta_objective
        meta modules updated -> meta_step_end
    students' records (with the features some request wants this step)
        -> loss_weights(phase="train") -> soft_targets* -> consensus_targets*
        -> loss_terms(phase="train") -> auxiliary_losses(phase="train") -> backward
        -> optimizer steps -> train_step_end

``*``: skipped when every student's weight of that term is a constant zero. Teachers' records
are computed when a hook first reads ``teacher_records``.

End of an epoch: ``evaluation_end(split="val")`` -> ``epoch_end`` (the built-in services keep the
best-on-val weights first and write the checkpoint last, with every plugin's ``save_state``). End
of the fit: ``evaluation_end(split="test")`` (last weights, then best-on-val) -> ``fit_end``
(``results.json`` is written first, the report sections collected last); a fit that
``trainer.max_steps`` stopped early calls ``fit_stopped`` instead.

Roles: which run calls a hook
-----------------------------

One ``collab-distill fit`` may run several engines, one inside the other, and each calls the
hooks of its own lifecycle (above). ``engine.role`` says which run is calling:

* ``"fit"``: the user's run, with the configured plugins (``plugins:``) and the always-on ones.
* ``"teacher_training"``: a cohort teacher with ``train_epochs`` (and no checkpoint) trained with
  plain cross-entropy as a run of its own, in ``RUN_DIR/teachers/<name>``. It runs after the
  user's run's set-up hooks and before its ``load_state``/``fit_start``, and its whole lifecycle
  fires (``configure`` ... ``fit_end``, ``epoch_end``, ``save_state``, ``report_sections``); its only
  student is the teacher. Only the always-on plugins (less ``--disable_plugins``) are registered
  in it: a configured plugin never sees this role; an always-on one does.
* ``"stage"``: each stage of a staged fit (``stages:``), a whole run with the configured and the
  always-on plugins (the same plugin objects for every stage, so their state spans the stages).
  The staged run itself (role ``"fit"``) calls only the set-up hooks (``configure`` ...
  ``meta_modules``) before its teachers are trained and its stages run.

``collab-distill validate|test`` is role ``"fit"`` with ``engine.fitting`` False: the set-up hooks
and ``evaluation_end`` only. A plugin that should act once per run (write a summary, count the
user's epochs) checks ``engine.role`` (e.g. ``if engine.role != "fit": return``).

Ranks: under DDP every process runs the same loop, so every hook is called on every rank
(``engine.fabric.global_rank``; ``engine.fabric.is_global_zero`` on rank 0), each with its own
batches and losses, except ``report_sections`` (rank 0 only). ``evaluation_end``'s metrics are
gathered over the ranks (the same everywhere). Write files on rank 0 only; anything that must
agree across ranks (a decision, a counter) must be computed the same way on every rank.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from torch import Tensor, nn

    from collab_distill.engine_view import EngineView as Engine
    from collab_distill.features import FeatureRequest
    from collab_distill.meta import MetaModule
    from collab_distill.records import Knowledge, LossWeights, SoftTarget
    from collab_distill.report import ReportSection

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
        whose weight is exactly zero; per-image weights can still name one term's number, e.g.
        ``LossWeights(alpha, beta, gamma, constant=(None, None, 0.0))`` skips the consensus hook
        and term (``None``: that weight is per image). Per-unit factors (``unit_beta``, ``unit_gamma``: ``[U]``,
        e.g. one per shared region of a detection batch) scale each unit's KL before the image's
        mean over its units; give them mean 1 over each image's units to spread the image's weight.

    The answer is checked, and a wrong one stops the run naming the plugin, the hook and what was
    expected: a ``LossWeights`` for each student and for no other name; ``alpha``, ``beta``,
    ``gamma`` and tensor ``terms`` floating-point ``[B]`` tensors (``B`` = the student record's
    ``num_images``), ``unit_beta``/``unit_gamma`` ``[U]``. Values must be finite and >= 0: numbers
    are judged at once, tensors on the device on the first training step and then with the NaN
    guard's flags (every ``trainer.log_every_n_steps`` steps and before each checkpoint; with
    ``trainer.detect_nonfinite``), so checking adds no host synchronisation to a step; a NaN
    loss that weights from a plugin caused is blamed on that plugin, not on the learning rate.

    In the finite-difference meta step this hook (and the target hooks) is called at perturbed
    student parameters with ``records`` of the unperturbed ones: read records as data (detached).
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
    :return: ``{student name: SoftTarget}`` whose ``probs`` have the shape of that student's
        logits, ``[units, classes]`` (checked: a wrong shape or a name that is no student stops the
        run naming the plugin); a student left out gets no beta term. The built-in
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

    :return: ``{student name: SoftTarget}`` (``probs`` shaped as the student's logits,
        ``[units, classes]``; checked as for ``soft_targets``), or ``None`` for no consensus term
        (the default).
    """


@hookspec(firstresult=True)
def collab_distill_meta_objective(
    engine: Engine, batch: Any, records: Mapping[str, Knowledge], weights: Mapping[str, LossWeights]
) -> Tensor | None:
    """The scalar the meta-learned modules minimise, from records on a held-out meta batch.

    :param batch: the meta batch (the next batch of the ``meta`` split, on the device).
    :param records: ``{student: Knowledge}`` of the looked-ahead students on the meta batch, with
        graph: each student after one step ``theta' = theta - lr * dL_train/dtheta`` of the
        lookahead's training loss, so their parameters depend on the meta modules.
    :param weights: ``{student: LossWeights}`` that lookahead's training loss used on the
        training batch (``collab_distill_loss_weights`` with ``phase="lookahead"`` at the
        students' current parameters; the supervised-only weights for a student in warm-up).
        Weights from a meta module keep their graph, so the objective can shape them directly,
        e.g. ``+ lam * sum_s weights[s].beta.mean()``.
    :return: a scalar tensor (``None``: let another plugin answer). The built-in default is the
        sum over students of their mean supervised loss (MC-Distil's eq. 6); it ignores ``weights``.

    The objective may depend on ``records``, ``weights``, the meta modules (called through
    ``engine.meta_modules``; inside this hook ``engine.student_module`` gives a plugin module at its
    looked-ahead parameters) and on constants (the batches, the teachers). Its gradient reaches
    the meta modules ``phi`` through the lookahead (``records``) and directly (``weights``, meta
    modules it calls), as ``meta.hypergradient`` says:

    * ``second_order``: exact. The lookahead keeps its graph (``create_graph``), ``weights`` keep
      theirs, and autograd differentiates the objective with respect to ``phi`` through both.
    * ``finite_difference``: one backward of the objective gives ``v = dL_meta/dtheta'`` and the
      direct part (through ``weights`` or a meta module it calls, exact); the lookahead's part,
      ``-lr * d^2 L_train / (dphi dtheta) v``, is a central difference of ``dL_train/dphi`` at the
      students perturbed to ``theta +- eps * lr * v``, where the loss-weight and target hooks
      read the unperturbed students' records (the signals are held fixed, as the exact
      hypergradient treats them) and ``weights`` stay those of the unperturbed students. The
      lookahead's gradient is taken without keeping its graph, so weights that reach the
      students' parameters with graph (records read without ``detach``) cannot be
      differentiated here: read records as data.
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
def collab_distill_feature_requests(engine: Engine) -> list[FeatureRequest] | None:
    """Intermediate outputs this plugin reads, by module path (see :mod:`collab_distill.features`).

    Called once at set-up, after ``configure``. The engine checks every path (an unknown one is
    an error listing the nearest valid paths), registers forward hooks, and runs two real images
    through every member to fill ``engine.feature_shapes`` (which ``student_modules`` can use to
    size adaptors). During training, ``records[member].features[request.feature]`` holds the
    tensor on every step where the request's ``when`` says so: with graph for students, without
    for teachers, under the run's autocast, also inside the bilevel lookahead. On other steps the
    key is absent (read it with ``features.get``).
    """


@hookspec
def collab_distill_student_modules(engine: Engine) -> Mapping[str, Mapping[str, nn.Module]] | None:
    """Trainable modules this plugin attaches to students: ``{student: {name: module}}``
    (a FitNets regressor, a projection head).

    Called once at set-up, after ``feature_requests``. The engine moves each module to the
    student's device, wraps it for DDP, optimises it with the student's optimizer and schedule,
    includes it in the bilevel lookahead, checkpoints and resumes it; export leaves it out. Call
    it through ``engine.student_module(student, name)`` (never keep your own reference to call:
    the engine hands out the wrapped module, or its looked-ahead version inside the meta step).
    A trainable tensor that reaches the loss without being declared here (or as a meta module)
    stops the fit at its first step with an error naming it.
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
    :return: ``{term name: scalar tensor}``. Terms are logged under their names and added to the
        loss as they are: the engine neither weighs them with ``weights`` nor skips them during a
        student's warm-up (``engine.warming_up(student)``); the plugin decides both. A term named
        ``<student>/<term>`` belongs to that student: it is part of ``<student>/loss``. Each term
        must be a 0-d floating-point tensor (checked every step, naming the plugin) and finite
        (judged with the NaN guard's flags, as loss weights are: a NaN term is blamed on its plugin).
    """


@hookspec
def collab_distill_declare_loss_terms(engine: Engine) -> Sequence[str] | None:
    """Names of the per-image loss terms this plugin adds (``collab_distill_loss_terms``), declared
    once at set-up so that loss-weight providers can weigh them (``LossWeights.terms``; a C-Net
    sizes its head from ``engine.loss_terms``). Names are unique across plugins, letters, digits,
    ``_`` and ``-``, and none of ``supervised``, ``distill``, ``consensus``, ``loss``.

    Called after ``configure``; every role.
    """


@hookspec
def collab_distill_loss_terms(
    engine: Engine,
    batch: Any,
    records: Mapping[str, Knowledge],
    teacher_records: Mapping[str, Knowledge],
    weights: Mapping[str, LossWeights],
    temperature: float,
    phase: str,
) -> Mapping[str, Mapping[str, Tensor]] | None:
    """This plugin's declared terms, per image and unweighted: ``{student: {name: [B] tensor}}``.

    The engine adds ``weights[student].term_weight(name) * term`` to the student's per-image loss,
    like the built-in terms (so a loss-weight provider weighs them per image, and a meta-learned
    one learns how), logs the weighted term as ``<student>/<name>``, and skips students in
    warm-up. Skip a student whose ``weights[student].uses(name)`` is false (its weight is 0).
    Unlike ``auxiliary_losses`` the term is never a scalar: one value per image (``[B]``).

    :param phase: ``"train"`` or ``"lookahead"`` (inside the bilevel step: keep the graph).
    """


@hookspec
def collab_distill_report_sections(engine: Engine, results: Mapping[str, Any]) -> list[ReportSection] | None:
    """What this plugin adds to ``collab-distill report``: sections with a title, Markdown text
    and figures (:class:`~collab_distill.report.ReportSection`).

    Called once at the end of every run's fit (roles ``fit``, ``teacher_training``, ``stage``), on
    rank 0 only, by the built-in ``report`` service after every other ``fit_end`` (what they wrote
    is there to draw from); not for a run that ``max_steps`` stopped early. Write figures under
    ``engine.run_dir / "plugins" / <your name>`` and return sections whose ``figures`` are their
    paths relative to ``engine.run_dir`` (``plugins/<name>/x.png``). The service stores the
    sections with :func:`~collab_distill.report.write_sections` (``RUN_DIR/report_sections.json``;
    a figure missing or outside the run folder is an error); the report renders them after its
    generic parts (results, loss weights, meta steps, accuracy vs MACs), figures copied beside it.

    :param results: what went into ``results.json``.
    :return: a list of sections (in the order to show them), or ``None`` for none.
    """


# ---------------------------------------------------------------------------- events


@hookspec
def collab_distill_configure(engine: Engine) -> None:
    """The engine and its plugins exist; validate configuration here (raise ConfigError).

    Every role, every rank; also for ``collab-distill validate|test``.
    """


@hookspec
def collab_distill_fit_start(engine: Engine) -> None:
    """Models, optimizers and data loaders are set up; training is about to begin.

    Roles ``fit`` (not the staged run itself), ``teacher_training``, ``stage``; every rank.
    """


@hookspec
def collab_distill_train_step_end(engine: Engine, step: int, losses: Mapping[str, float]) -> None:
    """A training step finished.

    ``losses`` maps names to numbers or detached 0-dim tensors: always ``loss`` and
    ``<student>/loss``, and on logging steps (every ``trainer.log_every_n_steps``) also
    ``<student>/supervised``, ``/distill``, ``/consensus`` (each term as it enters the loss: weighted,
    the KL terms times tau^2), the auxiliary terms, and ``/alpha``, ``/beta``, ``/gamma`` (batch
    means). ``<student>/loss`` is the sum of the student's terms and of its auxiliary terms (those
    named ``<student>/...``). Call ``float()`` only when needed (it synchronises with the GPU).

    Roles ``fit``, ``teacher_training``, ``stage``; every rank, with that rank's losses.
    """


@hookspec
def collab_distill_meta_step_end(engine: Engine, step: int, meta_loss: Tensor, grad_norm: Tensor) -> None:
    """A bilevel meta step finished.

    :param step: the training step it belongs to, numbered as ``train_step_end``, the logged
        metrics (``train/meta/loss`` is logged at this step) and ``engine.meta_history`` number it:
        1 for the first step of the fit (the meta step runs before that step's student update).
    :param meta_loss: the meta objective after the lookahead, a detached 0-dim tensor.
    :param grad_norm: the norm of the meta modules' gradient (before any ``meta.grad_clip``), a
        detached 0-dim tensor; a norm that stays zero means the meta objective does not reach the
        modules. ``float()`` of either is a host synchronisation: the engine itself reads them only
        on logging steps (they are in ``engine.meta_history`` from then on).

    Only in runs with meta modules (``fit``, ``stage``; a teacher's CE run has none unless an
    always-on plugin adds them); every rank.
    """


@hookspec
def collab_distill_epoch_end(engine: Engine, epoch: int, metrics: Mapping[str, float]) -> None:
    """An epoch (training and validation) finished.

    Roles ``fit``, ``teacher_training`` (the teacher's own epochs, before the user's first one)
    and ``stage``: check ``engine.role`` to count only the user's epochs. Every rank.
    """


@hookspec
def collab_distill_evaluation_end(engine: Engine, split: str, metrics: Mapping[str, Mapping[str, float]]) -> None:
    """An evaluation of every student on ``split`` finished; ``metrics[student][name]``.

    Every role, and ``collab-distill validate|test``; every rank, with metrics gathered over the
    ranks. At the end of a fit it is also called for the teachers' test scores.
    """


@hookspec
def collab_distill_fit_stopped(engine: Engine, results: Mapping[str, Any]) -> None:
    """``trainer.max_steps`` stopped the fit before ``max_epochs``; ``results`` (``status:
    stopped``, the step and epoch) is what goes into ``results.json``. The built-in checkpointing
    writes the checkpoint a ``--resume`` continues from; ``fit_end`` is not called.

    Roles ``fit``, ``stage``; every rank.
    """


@hookspec
def collab_distill_fit_end(engine: Engine, results: Mapping[str, Any]) -> None:
    """Training finished; ``results`` is what goes into ``results.json``.

    Roles ``fit`` (not the staged run itself), ``teacher_training``, ``stage``; every rank (on
    rank 0 after ``results.json`` is written).
    """


@hookspec
def collab_distill_save_state(engine: Engine, state: dict[str, Any]) -> None:
    """A checkpoint is being written: put this plugin's state under a key of its own.

    Roles ``fit``, ``teacher_training``, ``stage`` (each run has its own checkpoint); every rank
    builds the state, rank 0 writes it.
    """


@hookspec
def collab_distill_load_state(engine: Engine, state: Mapping[str, Any]) -> None:
    """A checkpoint is being restored: take this plugin's state back from its key.

    On ``--resume`` of the run, a stage or a teacher's run that wrote it; every rank.
    """
