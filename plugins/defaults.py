"""Built-in defaults for every provider hook (always on; each answer is ``trylast``).

* loss weights: supervised loss only (alpha=1, beta=gamma=0), i.e. plain training;
* soft target: the teacher's distribution, or the mean of the teachers' distributions;
* consensus target: none;
* meta objective: the sum over students of their mean supervised loss on the meta batch
  (MC-Distil's eq. 6).

Any configured plugin that answers a hook overrides these.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from collab_distill.hookspecs import hookimpl
from collab_distill.records import Knowledge, LossWeights, SoftTarget, mean_of_teachers


@hookimpl(trylast=True)
def collab_distill_loss_weights(records: Mapping[str, Knowledge]) -> dict[str, LossWeights]:
    return {
        name: LossWeights.constant_weights(rec.num_images, 1.0, 0.0, 0.0, rec.logits.device) for name, rec in records.items()
    }


@hookimpl(trylast=True)
def collab_distill_soft_targets(
    records: Mapping[str, Knowledge], teacher_records: Mapping[str, Knowledge], temperature: float
) -> dict[str, SoftTarget] | None:
    if not teacher_records:
        return None
    target = SoftTarget(probs=mean_of_teachers(teacher_records, temperature))
    return {name: target for name in records}


@hookimpl(trylast=True)
def collab_distill_meta_objective(records: Mapping[str, Knowledge]) -> Tensor:
    return sum((rec.supervised_loss.mean() for rec in records.values()), torch.zeros(()))


def describe() -> str:  # pragma: no cover - used by `collab-distill plugins`
    return __doc__ or ""
