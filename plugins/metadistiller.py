"""MetaDistiller (Liu et al., ECCV 2020): self-boosting of a multi-exit network whose early exits
distil soft targets from a meta-learned top-down label generator.

* :class:`TopDownLabelGenerator` (eq. 5) fuses the student's stage maps from the deepest one
  down, ``F^_K = conv1x1(F_K)`` and ``F^_k = conv3x3(Up(F^_{k+1}) + conv1x1(F_k))``, and a
  bottleneck classifier per early exit turns ``F^_k`` into logits ``T_k``; the target of exit
  ``k`` is ``softmax(T_k / tau)``. Its input maps are detached: targets never train the student's
  features directly.
* :class:`MetaDistiller` applies eq. 3-4 (see :mod:`collab_distill.plugins.self_distillation`)
  with these targets and hands the generators (one per student) to the engine as the meta
  module ``label_generator``. The engine's bilevel step trains them (eq. 6-8): a one-step
  lookahead of the students on the training batch, then the meta objective on a held-out meta
  batch (the paper's L^val), see ``meta_objective`` and ``target_ce``.

The auxiliary-loss hook's ``phase`` says whether the cohort loss being built is the real step
(targets computed without graph: only the meta step updates the generator) or the bilevel
step's lookahead (targets keep the generator's graph).

The hypergradient must be ``second_order`` (exact; checked against a numerical derivative in
the tests): the finite-difference one would also move the generator's detached input maps.

What the generator learns is reported: every meta step logs (``engine.log_dict``)
``metadistiller/<student>/entropy`` (mean entropy of the generated targets on the lookahead
batch, nats; uniform = log K), ``/agreement`` (their top-1 == label), the same per exit
(``/exit<k>_entropy``, ``/exit<k>_agreement``), ``/grad_norm`` (the generator's meta-gradient
as its optimizer receives it, after ``meta.grad_clip``) and the meta objective's parts
``metadistiller/students_ce`` and ``metadistiller/target_ce``. At the end of a fit the run
folder gets ``plugins/metadistiller/targets.json``: per student and early exit, on the val split,
the targets' mean entropy, ``log K``, and their top-1 agreement with the labels and with the
student's final exit.

Why the defaults depart from the paper (measured on digits, examples/methods/metadistiller.yaml,
seed 0 unless said; val split only, never test; log K = 2.303):

* The paper's form (L^val = the final exit's CE only, no other signal for the generator) gives
  the generator a meta-gradient that carries no information about the label: per image, the
  descent direction on the generated logits has cosine +0.00 +- 0.1 with ``onehot(y) - p``, and
  its steepest class is the label for 2-19% of the images (chance 10%), in every meta epoch.
  The meta-gradient norm also decays from 0.1-0.2 to 1e-3-5e-3. With Adam (its step is about
  ``lr`` whatever the gradient's size, so the small norm is not the problem; the direction is)
  at lr 1e-3 the 51 meta steps of Algorithm 1 (M = 5) leave the generator's logits at their
  initial scale (std 0.4): targets at 0.96 log K, label agreement 0.10 on val, i.e. label
  smoothing. At the paper's lr 0.1 Adam amplifies the noise: targets sharp (0.33 log K) but
  off-class (agreement 0.09) and the early exits fall from 80-95% to 66-69% val top-1; clipping
  the meta-gradient (``meta.grad_clip: 0.01``) does not help (0.13 log K, agreement 0.08, early
  exits 48-62%), as Adam normalises the step anyway.
* ``meta_objective="exits"``: L^val is the CE of every exit of the looked-ahead student (the
  model's outputs; the early exits are those the targets supervise). The exit heads then link a
  target to the meta loss, and once the students train the meta-gradient points to the label
  (meta epochs 5 and 10: cosine mostly +0.1..+0.45, up to +0.55; steepest class = label for
  12-62% of the images; epoch 0, untrained students: still ~0 / ~10%). Alone it is still too
  weak and too late: targets at 0.95 / 0.88 log K with agreement 0.19 / 0.25 at lr 1e-3 / 1e-2,
  and at 0.1 sharper (0.73 log K) but off-class (0.13), because the first meta epoch, with
  untrained students, is noise.
* ``target_ce``: the generator's own CE to the labels of the meta batch is added to L^val (the
  paper has no such term; its generator learns from the meta-gradient only). This is what keeps
  the targets on the class. The CE on the lookahead's training batch instead was measured too
  (agreement 0.93-0.94, val final exit 97.07% over 3 seeds vs 97.45% below) and dropped.
* Meta steps more often: with M = 5 (51 meta steps) the generator lags behind the students'
  features between meta epochs; with the two changes above label agreement reached only
  0.40 / 0.71 / 0.80 / 0.70 at Adam lr 1e-3 (with the final-exit L^val) / 1e-2 / 3e-2 / 0.1
  (seed 0), and the wrong targets cost the early exits accuracy (lr 3e-2, 3 seeds: 89.4% mean
  val top-1 of the early exits, vs 90.8% with the near-uniform targets of the paper's form and
  95.3% with SD). A meta step every 2nd training
  step of every epoch (128 steps on digits, at lr 1e-2) gives targets at 0.18 log K with
  agreement 0.91 (3 seeds), early exits 93.0%, final exit 97.45% val top-1 (SD 97.76%, the
  paper's form 96.91%; these differences are below one val image per student and seed). A meta
  step at every step (255) gave agreement 0.94 and early exits 94.3% (2 seeds) at 1.6x the
  time, with no better final exit (97.11% vs SD 97.25% on those seeds).
* Adam lr 1e-2 (paper 0.1, earlier default 1e-3): see the agreements above; not re-tuned at
  the final schedule. Temperature and alpha stay the paper's 1 and 0.5.

So the paper's form is ``MetaDistiller(lr=0.1, meta_objective="final", target_ce=0)`` with
``meta: {every_n_epochs: 5, steps_in_meta_epoch: every_n_steps, every_n_steps: 1}``.
Also different from the paper: the meta batch comes from the engine's fixed held-out ``meta``
split rather than from a fresh random half of the training set at each meta step.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Optional, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from collab_distill.engine_view import EngineView
from collab_distill.hookspecs import hookimpl
from collab_distill.meta import MetaModule
from collab_distill.plugins.self_distillation import EXIT_LOGITS, ExitSupervision
from collab_distill.records import Knowledge, SoftTarget
from collab_distill.report import ReportSection
from collab_distill.task import ConfigError
from collab_distill.tasks.classification.multi_exit import BottleneckHead, default_width

__all__ = ["TopDownLabelGenerator", "MetaDistiller", "META_MODULE"]

#: the name of MetaDistiller's meta module (a ModuleDict of one generator per student)
META_MODULE = "label_generator"


def entropy(probs: Tensor) -> Tensor:
    """``[..., K]`` distributions -> ``[...]`` entropies (nats)."""
    return -(probs * probs.clamp_min(1e-12).log()).sum(-1)


def _wide(x: Tensor) -> Tensor:
    """At least float32 (half-precision logits are widened, float64 ones kept)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def default_fusion_width(stage_channels: Sequence[int]) -> int:
    """A quarter of the deepest stage's width, between 8 and 256 (FPN's width)."""
    return max(8, min(256, stage_channels[-1] // 4))


class TopDownLabelGenerator(nn.Module):
    """Eq. 5's top-down fusion plus one bottleneck classifier per early exit.

    Args:
        stage_channels: channels of the student's stage maps ``F_1 .. F_K``, shallow to deep.
        num_classes: size of the generated logits.
        downsamples: stride-2 convs of each early exit's head (as the student's own exit heads,
            so ``T_k`` is read at the final stage's resolution); ``K - 1`` numbers.
        width: channels of the fused maps ``F^_k`` (default :func:`default_fusion_width`).
        head_width: bottleneck width of the heads (default: from ``width``).
    """

    def __init__(
        self,
        stage_channels: Sequence[int],
        num_classes: int,
        downsamples: Sequence[int],
        width: Optional[int] = None,
        head_width: Optional[int] = None,
    ) -> None:
        super().__init__()
        channels = list(stage_channels)
        if len(channels) < 2 or len(downsamples) != len(channels) - 1:
            raise ValueError(f"TopDownLabelGenerator needs K >= 2 stages and K - 1 downsamples, "
                             f"got {channels} and {list(downsamples)}")
        width = width or default_fusion_width(channels)
        head_width = head_width or default_width([width])
        self.lateral = nn.ModuleList(nn.Conv2d(c, width, 1) for c in channels)  # conv1x1(F_k), k = 1..K
        self.refine = nn.ModuleList(nn.Conv2d(width, width, 3, padding=1) for _ in channels[:-1])  # conv3x3, k < K
        self.heads = nn.ModuleList(BottleneckHead(width, head_width, width, num_classes, d) for d in downsamples)

    @property
    def num_stages(self) -> int:
        return len(self.lateral)

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        """``[B, K]`` logits ``T_1 .. T_{K-1}`` from the stage maps ``F_1 .. F_K``."""
        if len(features) != self.num_stages:
            raise ValueError(f"expected {self.num_stages} stage maps, got {len(features)}")
        fused = self.lateral[-1](features[-1])
        deep_to_shallow = []
        for k in reversed(range(self.num_stages - 1)):
            up = F.interpolate(fused, size=features[k].shape[-2:], mode="bilinear", align_corners=False)
            fused = self.refine[k](up + self.lateral[k](features[k]))
            deep_to_shallow.append(self.heads[k](fused))
        return deep_to_shallow[::-1]


def _generators(engine: EngineView) -> nn.ModuleDict:
    """The meta module ``label_generator``: one :class:`TopDownLabelGenerator` per student."""
    generators = engine.meta_modules[META_MODULE]
    assert isinstance(generators, nn.ModuleDict)  # MetaDistiller.module, which collab_distill_meta_modules declared
    return generators


class MetaDistiller(ExitSupervision):
    """Early exits learn from labels and from a meta-learned top-down label generator.

    Args:
        alpha: CE weight of an early exit; ``1 - alpha`` weighs the KL to the generated target
            (paper: 0.5).
        temperature: tau of the generated targets and the KL (paper: 1); ``None``: ``trainer.temperature``.
        lr: Adam learning rate of the generators (paper: 0.1; see the module's notes for 1e-2).
        weight_decay: Adam weight decay of the generators (the paper states none).
        width: channels of the fused maps (default: a quarter of the deepest stage's, 8..256).
        head_width: bottleneck width of the generator's heads.
        meta_objective: L^val on the meta batch, summed over students: ``"exits"`` the sum over
            every exit of the looked-ahead student of its mean CE, ``"final"`` the final exit's
            only (the engine's default objective, the paper's form).
        target_ce: weight of the generators' own CE to the meta batch's labels (``T_k / tau``
            of every early exit) in L^val; 0 leaves the generator to the meta-gradient alone,
            as in the paper.
    """

    def __init__(
        self,
        alpha: float = 0.5,
        temperature: Optional[float] = None,
        lr: float = 1e-2,
        weight_decay: float = 0.0,
        width: Optional[int] = None,
        head_width: Optional[int] = None,
        meta_objective: Literal["final", "exits"] = "exits",
        target_ce: float = 1.0,
    ) -> None:
        super().__init__(alpha=alpha, temperature=temperature)
        if not lr > 0 or not weight_decay >= 0:
            raise ConfigError(f"MetaDistiller: lr={lr} must be > 0 and weight_decay={weight_decay} >= 0")
        for key, value in (("width", width), ("head_width", head_width)):
            if value is not None and value < 1:
                raise ConfigError(f"MetaDistiller.{key}={value} must be >= 1 (or null for the default)")
        if meta_objective not in ("final", "exits"):
            raise ConfigError(f"MetaDistiller.meta_objective={meta_objective!r} must be 'final' or 'exits'")
        if not target_ce >= 0:
            raise ConfigError(f"MetaDistiller.target_ce={target_ce} must be >= 0")
        self.lr = lr
        self.weight_decay = weight_decay
        self.width = width
        self.head_width = head_width
        self.meta_objective = meta_objective
        self.target_ce = target_ce
        self.module: Optional[nn.ModuleDict] = None
        # what the last meta step saw (logged at its end): per student, per exit (entropy, agreement)
        self._step_stats: dict[str, list[tuple[Tensor, Tensor]]] = {}
        self._objective_parts: dict[str, Tensor] = {}
        self._grad_norms: dict[str, Tensor] = {}
        #: the numbers the last meta step logged
        self.last_logs: dict[str, float] = {}
        #: what the end of the fit wrote to targets.json
        self.last_statistics: dict[str, Any] = {}

    @hookimpl
    def collab_distill_configure(self, engine: EngineView) -> None:
        ExitSupervision.collab_distill_configure(self, engine)
        if engine.meta_config.hypergradient != "second_order":
            # a central difference in the students' parameters also moves the generator's input
            # maps, so it differentiates through the detach and gives a different (wrong) gradient
            raise ConfigError(
                f"MetaDistiller needs meta.hypergradient=second_order (got {engine.meta_config.hypergradient}): "
                "the generator reads detached stage maps, which a finite-difference hypergradient "
                "cannot hold fixed; set meta.hypergradient: second_order"
            )
        assert engine.info is not None  # set before configure
        generators = {}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(engine.seed * 1_000 + 11)  # the generators' initialisation depends on the seed only
            for name, model in engine.students.items():
                net = getattr(model, "module", model)
                channels, downsamples = getattr(net, "stage_channels", None), getattr(net, "head_downsamples", None)
                if channels is None or downsamples is None:
                    raise ConfigError(
                        f"MetaDistiller: cohort.students.{name} declares exits but not its stage_channels/"
                        "head_downsamples; build it with collab_distill.tasks.classification.MultiExit"
                    )
                generators[name] = TopDownLabelGenerator(
                    channels, engine.info.num_classes, downsamples, self.width, self.head_width
                )
        self.module = nn.ModuleDict(generators)

    @hookimpl
    def collab_distill_meta_modules(self, engine: EngineView) -> list[MetaModule]:
        assert self.module is not None
        lr, wd = self.lr, self.weight_decay
        return [MetaModule(META_MODULE, self.module, lambda p: torch.optim.Adam(p, lr=lr, weight_decay=wd))]

    def generated_logits(self, engine: EngineView, name: str, record: Knowledge, phase: str = "train") -> list[Tensor]:
        """``T_1 .. T_{K-1}`` of student ``name`` from its record's (detached) stage maps.

        In the bilevel step's lookahead they keep the generator's graph (the meta-gradient flows
        through them); in the real step they are computed without one, so the students' loss
        leaves no gradient on the generator, which only the meta step updates.
        """
        generator = _generators(engine)[name]
        assert isinstance(generator, TopDownLabelGenerator)
        dtype = next(generator.parameters()).dtype
        stages = [record.features[f"stage_{k}"].detach().to(dtype) for k in range(1, generator.num_stages + 1)]
        with torch.set_grad_enabled(phase == "lookahead" and torch.is_grad_enabled()):
            return generator(stages)

    def exit_targets(self, engine: EngineView, name: str, record: Knowledge, phase: str) -> list[Optional[SoftTarget]]:
        tau = self.tau(engine)
        probs = [F.softmax(_wide(t) / tau, dim=-1) for t in self.generated_logits(engine, name, record, phase)]
        if phase == "lookahead":  # what the meta step sees, logged at its end (no host sync here)
            with torch.no_grad():
                self._step_stats[name] = [(entropy(p).mean(), (p.argmax(-1) == record.unit_labels).float().mean()) for p in probs]
        return [SoftTarget(probs=p) for p in probs]

    @hookimpl
    def collab_distill_meta_objective(self, engine: EngineView, batch: Any, records: Mapping[str, Knowledge]) -> Optional[Tensor]:
        """L^val on the meta batch: the students' CE (final exit, or every exit) plus
        ``target_ce`` times the generators' CE to the labels. ``None`` (the engine's default,
        the final exits' CE) in the paper's form."""
        if self.meta_objective == "final" and self.target_ce == 0:
            return None
        tau = self.tau(engine)
        students: Tensor | float = 0.0
        targets: Tensor | float = 0.0
        for name, rec in records.items():
            labels = rec.unit_labels
            if self.meta_objective == "exits":
                for logits in rec.features[EXIT_LOGITS]:
                    ce = F.cross_entropy(_wide(logits), labels, reduction="none", ignore_index=-1)
                    students = students + rec.per_image(ce).mean()
            else:
                students = students + rec.supervised_loss.mean()
            if self.target_ce:
                for t in self.generated_logits(engine, name, rec, "lookahead"):
                    ce = F.cross_entropy(_wide(t) / tau, labels, reduction="none", ignore_index=-1)
                    targets = targets + rec.per_image(ce).mean()
        assert isinstance(students, Tensor)
        self._objective_parts = {"students_ce": students.detach()}
        if isinstance(targets, Tensor):
            self._objective_parts["target_ce"] = targets.detach()
            return students + self.target_ce * targets
        return students

    @hookimpl
    def collab_distill_fit_start(self, engine: EngineView) -> None:
        generators = _generators(engine)

        def record_norms(optimizer: Any, args: Any, kwargs: Any) -> None:
            self._grad_norms = {  # on the device: read with the other statistics in one transfer
                n: torch.linalg.vector_norm(torch.stack(
                    [torch.linalg.vector_norm(p.grad.float()) for p in g.parameters() if p.grad is not None] or [torch.zeros(())]
                ))
                for n, g in generators.items()
            }

        engine.meta_optimizers[META_MODULE].register_step_pre_hook(record_norms)

    @hookimpl
    def collab_distill_meta_step_end(self, engine: EngineView, step: int, meta_loss: float) -> None:
        named: dict[str, Tensor] = {}
        for name, stats in self._step_stats.items():
            for k, (h, acc) in enumerate(stats, start=1):
                named[f"metadistiller/{name}/exit{k}_entropy"] = h
                named[f"metadistiller/{name}/exit{k}_agreement"] = acc
            named[f"metadistiller/{name}/entropy"] = torch.stack([h for h, _ in stats]).mean()
            named[f"metadistiller/{name}/agreement"] = torch.stack([a for _, a in stats]).mean()
        for name, norm in self._grad_norms.items():
            named[f"metadistiller/{name}/grad_norm"] = norm
        for part, value in self._objective_parts.items():
            named[f"metadistiller/{part}"] = value
        # one device-to-host transfer for every statistic of this meta step
        values = torch.stack([v.detach().float().reshape(()) for v in named.values()]).tolist() if named else []
        logs: dict[str, float] = dict(zip(named, values))
        self.last_logs = logs
        if logs:
            engine.log_dict(logs, step=step)

    @torch.no_grad()
    def target_statistics(self, engine: EngineView, split: str = "val") -> dict[str, Any]:
        """Per student and early exit, on ``split`` (students and generators in eval mode): the mean
        entropy of the generated targets ``softmax(T_k / tau)`` (nats; uniform = ``log K``), their
        top-1 agreement with the labels and with the student's final exit. Exact under DDP (sums
        are all-reduced; a sample a distributed sampler pads in twice counts twice)."""
        generators = _generators(engine)
        tau = self.tau(engine)
        loader = engine.batches(split)
        names = list(engine.students)
        sums: Optional[Tensor] = None  # [S, E, 3]: entropy, label agreement, final-exit agreement
        count = 0
        modes = {n: (engine.students[n].training, generators[n].training) for n in names}
        for n in names:
            engine.students[n].eval()
            generators[n].eval()
        try:
            for batch in loader:
                batch = engine.task.move_batch(batch, engine.fabric)
                rows = []
                for n in names:
                    record = engine.task.knowledge(engine.students[n], batch)
                    final = record.features[EXIT_LOGITS][-1].argmax(-1)
                    labels = record.unit_labels
                    per_exit = []
                    for t in self.generated_logits(engine, n, record, "eval"):
                        p = F.softmax(_wide(t) / tau, dim=-1)
                        top = p.argmax(-1)
                        per_exit.append(torch.stack([entropy(p).sum(), (top == labels).float().sum(),
                                                     (top == final).float().sum()]))
                    rows.append(torch.stack(per_exit))
                step = torch.stack(rows)
                sums = step if sums is None else sums + step
                count += int(labels.numel())
        finally:
            for n in names:
                engine.students[n].train(modes[n][0])
                generators[n].train(modes[n][1])
        if sums is None:
            return {}
        total = torch.tensor([float(count)], device=sums.device)
        assert engine.fabric is not None and engine.info is not None  # both set before configure
        if engine.fabric.world_size > 1:
            sums = cast(Tensor, engine.fabric.all_reduce(sums, reduce_op="sum"))
            total = cast(Tensor, engine.fabric.all_reduce(total, reduce_op="sum"))
        means = (sums / total).cpu()
        log_k = math.log(engine.info.num_classes)
        students = {}
        for i, n in enumerate(names):
            exits = [
                {"exit": k + 1, "entropy": float(e), "entropy_over_log_k": float(e) / log_k,
                 "label_agreement": float(a), "final_exit_agreement": float(f)}
                for k, (e, a, f) in enumerate(means[i].tolist())
            ]
            students[n] = {
                "entropy": sum(x["entropy"] for x in exits) / len(exits),
                "entropy_over_log_k": sum(x["entropy_over_log_k"] for x in exits) / len(exits),
                "label_agreement": sum(x["label_agreement"] for x in exits) / len(exits),
                "exits": exits,
            }
        return {"split": split, "images": int(total.item()), "num_classes": engine.info.num_classes, "log_k": log_k,
                "temperature": tau, "students": students}

    @hookimpl
    def collab_distill_fit_end(self, engine: EngineView) -> None:
        """``plugins/metadistiller/targets.json`` in the run folder: :meth:`target_statistics` on val."""
        if self.module is None or "val" not in engine.splits():
            return
        stats = self.target_statistics(engine, "val")  # every rank (the sums are all-reduced)
        self.last_statistics = stats
        assert engine.fabric is not None
        if engine.fabric.is_global_zero and engine.run_dir is not None:
            folder = engine.run_dir / "plugins" / "metadistiller"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "targets.json").write_text(json.dumps(stats, indent=1) + "\n")

    @hookimpl
    def collab_distill_report_sections(self, engine: EngineView) -> Optional[list[ReportSection]]:
        """The report's section: ``plugins/metadistiller/targets.json`` as a table (per student and
        exit, the generated targets' entropy and their agreement with the label and the final exit)."""
        stats = self.last_statistics
        if not stats or engine.run_dir is None:
            return None
        assert engine.fabric is not None
        if not engine.fabric.is_global_zero:
            return None
        lines = [f"The label generator's targets on the {stats['split']} split ({stats['images']} images, temperature "
                 f"{stats['temperature']:g}; entropy in units of log K = {stats['log_k']:.3f}, uniform = 1), "
                 "from `plugins/metadistiller/targets.json`.", "",
                 "| student | exit | entropy / log K | agreement with label | agreement with final exit |",
                 "|---|---|---|---|---|"]
        for student, s in stats["students"].items():
            for x in s["exits"]:
                lines.append(f"| {student} | {x['exit']} | {x['entropy_over_log_k']:.3f} | {x['label_agreement']:.3f} | "
                             f"{x['final_exit_agreement']:.3f} |")
        return [ReportSection("MetaDistiller: generated targets", "\n".join(lines))]

    def __repr__(self) -> str:
        return (f"MetaDistiller(alpha={self.alpha}, temperature={self.temperature}, lr={self.lr}, "
                f"meta_objective={self.meta_objective}, target_ce={self.target_ce})")
