"""Deep Mutual Learning (Zhang et al., CVPR 2018): students without a teacher, each pulled
towards what its peers predict.

The consensus target of student ``k`` is the mean of the other students' distributions at
temperature tau, detached (each peer is a fixed target for this step, as in the paper's
alternating updates, which one simultaneous step approximates). With
``FixedLossWeights(alpha=1, beta=0, gamma=1)`` and ``tau = 1`` a student's loss is the paper's
``CE + 1/(K-1) * sum_l KL(p_l || p_k)`` up to the mean over peers being taken inside the KL
(``KL(mean_l p_l || p_k)``, the "ensemble of peers" form the paper also discusses for K > 2);
``per_peer: true`` gives the exact sum-of-KLs form.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F

from collab_distill.hookspecs import hookimpl
from collab_distill.plugin_manager import Plugin
from collab_distill.records import Knowledge, SoftTarget, TargetSet
from collab_distill.task import ConfigError

__all__ = ["DML", "peer_mean_targets"]


def peer_mean_targets(records: Mapping[str, Knowledge], temperature: float) -> dict[str, SoftTarget]:
    """For each student, the mean of the other students' softmax(logits / tau), detached."""
    probs = {name: F.softmax(r.logits.detach().float() / temperature, dim=-1) for name, r in records.items()}
    total = torch.stack(list(probs.values())).sum(dim=0)
    peers = len(probs) - 1
    return {name: SoftTarget(probs=(total - p) / peers) for name, p in probs.items()}


class DML(Plugin):
    """Each student's consensus (gamma) target is its peers' mean prediction.

    Args:
        per_peer: use ``mean_l KL(p_l || p_k)`` (the paper's sum of pairwise KLs, divided by
            K-1) instead of ``KL(mean_l p_l || p_k)``. Costs one KL per peer.
    """

    def __init__(self, per_peer: bool = False) -> None:
        self.per_peer = per_peer

    @hookimpl
    def collab_distill_configure(self, engine: Any) -> None:
        if len(engine.cohort.students) < 2:
            raise ConfigError("DML needs at least two students: each one learns from its peers")

    @hookimpl
    def collab_distill_consensus_targets(self, records: Mapping[str, Knowledge], temperature: float) -> dict[str, SoftTarget]:
        if not self.per_peer:
            return peer_mean_targets(records, temperature)
        probs = {name: F.softmax(r.logits.detach().float() / temperature, dim=-1) for name, r in records.items()}
        return {name: TargetSet([p for other, p in probs.items() if other != name]) for name in records}
