"""What ``results.json`` holds: every student tested with its last and its best-on-val weights."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any, Optional

from torch import nn

from collab_distill import console
from collab_distill.meta import meta_summary
from collab_distill.training.state import CohortState, LoopState
from collab_distill.wrapping import unwrap

__all__ = ["assemble_results"]

Evaluate = Callable[[str, Optional[Mapping[str, nn.Module]]], dict[str, dict[str, float]]]


def assemble_results(*, fabric: Any, cohort: CohortState, loop: LoopState, evaluate: Evaluate, seed: int, metric: str,
                     summaries: Mapping[str, dict[str, Any]], resumes: list[dict[str, Any]], has_meta: bool) -> dict[str, Any]:
    """Test every student with its last and its best-on-val weights (and the teachers)."""
    last = evaluate("test", None)
    best_members = {}
    for name, model in cohort.students.items():
        entry = loop.best.get(name)
        clone = copy.deepcopy(unwrap(model))
        if entry is not None:
            clone.load_state_dict(entry["state"])
        best_members[name] = clone
    best = evaluate("test", best_members)
    last_val = loop.history[-1] if loop.history else {}
    students: dict[str, Any] = {}
    for name in cohort.students:
        entry = loop.best.get(name, {})
        students[name] = {
            **summaries.get(name, {}),
            "last": {
                "epoch": loop.epoch,
                **{f"val_{k.split('/val_', 1)[1]}": v for k, v in last_val.items() if k.startswith(f"{name}/val_")},
                **{f"test_{k}": v for k, v in last[name].items()},
            },
            "best_on_val": {
                "epoch": entry.get("epoch"),
                f"val_{metric}": entry.get("value"),
                **{f"test_{k}": v for k, v in best[name].items()},
            },
        }
    results: dict[str, Any] = {
        "status": "finished",
        "seed": seed,
        "epochs": loop.epoch,
        "global_step": loop.global_step,
        "selection_metric": metric,
        "students": students,
        "teachers": {n: dict(summaries.get(n, {})) for n in cohort.teachers},
        "history": loop.history,
    }
    if resumes:
        results["resumes"] = resumes
    if has_meta:
        results["meta"] = meta_summary(loop.meta_history)
        if results["meta"]["zero_grad_share"] == 1.0:
            console.plain(fabric, f"[warning] the meta modules' gradient was exactly zero at all {len(loop.meta_history)} "
                                  "meta steps: the meta objective does not reach them, so they never learned")
    if cohort.teachers:
        for name, values in evaluate("test", cohort.teachers).items():
            results["teachers"][name]["test"] = values
    return results
