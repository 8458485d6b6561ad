"""Deep Mutual Learning (Zhang et al., CVPR 2018): students without a teacher, each pulled
towards what its peers predict.

With ``FixedLossWeights(alpha=1, beta=0, gamma=1)`` and ``tau = 1`` a student's loss is the
paper's ``CE + 1/(K-1) * sum_l KL(p_l || p_k)``: the mean over its peers ``l`` of one KL per peer
(``target: per_peer``, the default). Each peer's distribution at temperature tau is detached (a
fixed target for this step, as in the paper's alternating updates, which one simultaneous step
approximates).

``target: peers_mean`` instead takes the KL to the peers' mean distribution,
``KL(mean_l p_l || p_k)`` (the "ensemble of peers" variant the paper discusses for K > 2; by
convexity never larger than the per-peer mean). With two students both forms are the same.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
import torch.nn.functional as F

from collab_distill.engine_view import EngineView
from collab_distill.hookspecs import hookimpl
from collab_distill.plugin_manager import Plugin
from collab_distill.records import Knowledge, SoftTarget, TargetSet
from collab_distill.task import ConfigError

__all__ = ["DML", "peer_mean_targets", "per_peer_targets"]

Target = Literal["per_peer", "peers_mean"]


def _peer_probs(records: Mapping[str, Knowledge], temperature: float) -> dict[str, torch.Tensor]:
    return {name: F.softmax(r.logits.detach().float() / temperature, dim=-1) for name, r in records.items()}


def peer_mean_targets(records: Mapping[str, Knowledge], temperature: float) -> dict[str, SoftTarget]:
    """For each student, the mean of the other students' softmax(logits / tau), detached."""
    probs = _peer_probs(records, temperature)
    total = torch.stack(list(probs.values())).sum(dim=0)
    peers = len(probs) - 1
    return {name: SoftTarget(probs=(total - p) / peers) for name, p in probs.items()}


def per_peer_targets(records: Mapping[str, Knowledge], temperature: float) -> dict[str, TargetSet]:
    """For each student, its peers' softmax(logits / tau), detached, as a :class:`TargetSet`: its
    KL term is the mean of one KL per peer (the paper's loss)."""
    probs = _peer_probs(records, temperature)
    return {name: TargetSet([p for other, p in probs.items() if other != name]) for name in records}


class DML(Plugin):
    """Each student's consensus (gamma) target is its peers' predictions.

    Args:
        target: ``per_peer`` (default, the paper's): ``mean_l KL(p_l || p_k)``, one KL per peer;
            ``peers_mean``: ``KL(mean_l p_l || p_k)``, the KL to the peers' mean distribution
            (one KL per student; not the paper's loss for more than two students).
    """

    def __init__(self, target: Target = "per_peer") -> None:
        if target not in ("per_peer", "peers_mean"):
            raise ConfigError(f"DML.target={target!r}: choose per_peer (the paper's) or peers_mean")
        self.target = target

    def __repr__(self) -> str:
        return f"DML(target={self.target!r})"

    @hookimpl
    def collab_distill_configure(self, engine: EngineView) -> None:
        if len(engine.cohort.students) < 2:
            raise ConfigError("DML needs at least two students: each one learns from its peers")

    @hookimpl
    def collab_distill_consensus_targets(self, records: Mapping[str, Knowledge], temperature: float) -> Mapping[str, SoftTarget]:
        if self.target == "peers_mean":
            return peer_mean_targets(records, temperature)
        return per_peer_targets(records, temperature)
