"""MetaDistiller (Liu et al., ECCV 2020): self-boosting of a multi-exit network whose early exits
distil soft targets from a meta-learned top-down label generator.

* :class:`TopDownLabelGenerator` (eq. 5) fuses the student's stage maps from the deepest one
  down, ``F^_K = conv1x1(F_K)`` and ``F^_k = conv3x3(Up(F^_{k+1}) + conv1x1(F_k))``, and a
  bottleneck classifier per early exit turns ``F^_k`` into logits ``T_k``; the target of exit
  ``k`` is ``softmax(T_k / tau)``. Its input maps are detached: targets never train the student's
  features directly.
* :class:`MetaDistiller` applies eq. 3-4 (see :mod:`collab_distill.plugins.self_distillation`)
  with these targets and hands the generators (one per student) to the engine as the meta
  module ``label_generator``. The engine's bilevel step trains them (eq. 6-8) on its default
  meta objective, the students' final-exit CE on a held-out meta batch (the paper's L^val).
  Algorithm 1 updates the generator at every iteration of every M-th epoch (M = 5): set
  ``meta: {every_n_epochs: 5, steps_in_meta_epoch: every_n_steps, every_n_steps: 1}``.

The auxiliary-loss hook's ``phase`` says whether the cohort loss being built is the real step
(targets computed without graph: only the meta step updates the generator) or the bilevel
step's lookahead (targets keep the generator's graph).

The hypergradient must be ``second_order`` (exact; checked against a numerical derivative in
the tests): the finite-difference one would also move the generator's detached input maps.

Differences from the paper: the meta batch comes from the engine's fixed held-out ``meta`` split
rather than from a fresh random half of the training set at each meta step, and the generator's
Adam learning rate defaults to 1e-3 (the paper reports 0.1).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from collab_distill.hookspecs import hookimpl
from collab_distill.meta import MetaModule
from collab_distill.plugins.self_distillation import ExitSupervision
from collab_distill.records import Knowledge, SoftTarget
from collab_distill.task import ConfigError
from collab_distill.tasks.classification.multi_exit import BottleneckHead, default_width

__all__ = ["TopDownLabelGenerator", "MetaDistiller", "META_MODULE"]

#: the name of MetaDistiller's meta module (a ModuleDict of one generator per student)
META_MODULE = "label_generator"


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
            raise ValueError(f"TopDownLabelGenerator needs K >= 2 stages and K - 1 downsamples, got {channels} and {list(downsamples)}")
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


class MetaDistiller(ExitSupervision):
    """Early exits learn from labels and from a meta-learned top-down label generator.

    Args:
        alpha: CE weight of an early exit; ``1 - alpha`` weighs the KL to the generated target
            (paper: 0.5).
        temperature: tau of the generated targets and the KL (paper: 1); ``None``: ``trainer.temperature``.
        lr: Adam learning rate of the generators (paper: 0.1; default 1e-3 as the engine's other
            meta modules).
        weight_decay: Adam weight decay of the generators (the paper states none).
        width: channels of the fused maps (default: a quarter of the deepest stage's, 8..256).
        head_width: bottleneck width of the generator's heads.
    """

    def __init__(
        self,
        alpha: float = 0.5,
        temperature: Optional[float] = None,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        width: Optional[int] = None,
        head_width: Optional[int] = None,
    ) -> None:
        super().__init__(alpha=alpha, temperature=temperature)
        if not lr > 0 or not weight_decay >= 0:
            raise ConfigError(f"MetaDistiller: lr={lr} must be > 0 and weight_decay={weight_decay} >= 0")
        for key, value in (("width", width), ("head_width", head_width)):
            if value is not None and value < 1:
                raise ConfigError(f"MetaDistiller.{key}={value} must be >= 1 (or null for the default)")
        self.lr = lr
        self.weight_decay = weight_decay
        self.width = width
        self.head_width = head_width
        self.module: Optional[nn.ModuleDict] = None

    @hookimpl
    def collab_distill_configure(self, engine: Any) -> None:
        ExitSupervision.collab_distill_configure(self, engine)
        if engine.meta_config.hypergradient != "second_order":
            # a central difference in the students' parameters also moves the generator's input
            # maps, so it differentiates through the detach and gives a different (wrong) gradient
            raise ConfigError(
                f"MetaDistiller needs meta.hypergradient=second_order (got {engine.meta_config.hypergradient}): "
                "the generator reads detached stage maps, which a finite-difference hypergradient "
                "cannot hold fixed; set meta.hypergradient: second_order"
            )
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
    def collab_distill_meta_modules(self, engine: Any) -> list[MetaModule]:
        assert self.module is not None
        lr, wd = self.lr, self.weight_decay
        return [MetaModule(META_MODULE, self.module, lambda p: torch.optim.Adam(p, lr=lr, weight_decay=wd))]

    def generated_logits(self, engine: Any, name: str, record: Knowledge, phase: str = "train") -> list[Tensor]:
        """``T_1 .. T_{K-1}`` of student ``name`` from its record's (detached) stage maps.

        In the bilevel step's lookahead they keep the generator's graph (the meta-gradient flows
        through them); in the real step they are computed without one, so the students' loss
        leaves no gradient on the generator, which only the meta step updates.
        """
        generator = engine.meta_modules[META_MODULE][name]
        dtype = next(generator.parameters()).dtype
        stages = [record.features[f"stage_{k}"].detach().to(dtype) for k in range(1, generator.num_stages + 1)]
        with torch.set_grad_enabled(phase == "lookahead" and torch.is_grad_enabled()):
            return generator(stages)

    def exit_targets(self, engine: Any, name: str, record: Knowledge, phase: str) -> list[Optional[SoftTarget]]:
        tau = self.tau(engine)
        return [SoftTarget(probs=F.softmax(t.float() / tau, dim=-1)) for t in self.generated_logits(engine, name, record, phase)]

    def __repr__(self) -> str:
        return f"MetaDistiller(alpha={self.alpha}, temperature={self.temperature}, lr={self.lr})"
