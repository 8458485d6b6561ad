"""Faulty plugins for ``benchmarks/hostile_inputs.py`` (importable by ``class_path`` with
``benchmarks/`` on PYTHONPATH).

Each one is a mistake a plugin author can make on a public hook: a wrong type or shape in an
answer, a NaN, an exception, ending the process, state that cannot be saved. They are written the
way a third party would write them, with nothing of the engine's internals.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from collab_distill import (
    ConfigError,
    FeatureRequest,
    Knowledge,
    LossWeights,
    MetaModule,
    Plugin,
    ReportSection,
    SoftTarget,
    hookimpl,
)


def _weights(records: Mapping[str, Knowledge], alpha: float = 1.0) -> dict[str, LossWeights]:
    return {n: LossWeights.constant_weights(r.num_images, alpha, 0.0, 0.0, r.logits.device) for n, r in records.items()}


# ---------------------------------------------------------------------------- loss weights


class WeightsWrongType(Plugin):
    """``loss_weights`` answers a list of numbers instead of ``{student: LossWeights}``."""

    @hookimpl
    def collab_distill_loss_weights(self, records: Mapping[str, Knowledge]) -> Any:
        return [1.0, 0.0, 0.0]


class WeightsPlainNumbers(Plugin):
    """``loss_weights`` answers ``{student: (alpha, beta, gamma)}`` tuples, not LossWeights."""

    @hookimpl
    def collab_distill_loss_weights(self, records: Mapping[str, Knowledge]) -> Any:
        return {n: (1.0, 0.0, 0.0) for n in records}


class WeightsWrongShape(Plugin):
    """LossWeights whose tensors have one entry more than the batch has images."""

    @hookimpl
    def collab_distill_loss_weights(self, records: Mapping[str, Knowledge]) -> dict[str, LossWeights]:
        out = {}
        for n, r in records.items():
            ones = torch.ones(r.num_images + 1, device=r.logits.device)
            out[n] = LossWeights(ones, ones * 0, ones * 0)
        return out


class WeightsMissingStudent(Plugin):
    """``loss_weights`` answers an empty mapping: no student gets a weight."""

    @hookimpl
    def collab_distill_loss_weights(self, records: Mapping[str, Knowledge]) -> dict[str, LossWeights]:
        return {}


class WeightsUnknownStudent(Plugin):
    """``loss_weights`` answers for the students and for one named ``ghost`` that does not exist."""

    @hookimpl
    def collab_distill_loss_weights(self, records: Mapping[str, Knowledge]) -> dict[str, LossWeights]:
        out = _weights(records)
        first = next(iter(records.values()))
        out["ghost"] = LossWeights.constant_weights(first.num_images, 1.0, 0.0, 0.0, first.logits.device)
        return out


class WeightsNegative(Plugin):
    """Per-image alpha of -1: the supervised loss is maximised."""

    @hookimpl
    def collab_distill_loss_weights(self, records: Mapping[str, Knowledge]) -> dict[str, LossWeights]:
        out = {}
        for n, r in records.items():
            minus = -torch.ones(r.num_images, device=r.logits.device)
            out[n] = LossWeights(minus, minus * 0, minus * 0)
        return out


class WeightsIntegerTensor(Plugin):
    """Per-image weights as an int64 tensor (``torch.ones(B, dtype=torch.long)``)."""

    @hookimpl
    def collab_distill_loss_weights(self, records: Mapping[str, Knowledge]) -> dict[str, LossWeights]:
        out = {}
        for n, r in records.items():
            one = torch.ones(r.num_images, dtype=torch.long, device=r.logits.device)
            out[n] = LossWeights(one, one * 0, one * 0)
        return out


class WeightsNaNFromStart(Plugin):
    """Per-image alpha of NaN on the very first step (given as a tensor, no constant)."""

    @hookimpl
    def collab_distill_loss_weights(self, records: Mapping[str, Knowledge]) -> dict[str, LossWeights]:
        out = {}
        for n, r in records.items():
            nan = torch.full((r.num_images,), float("nan"), device=r.logits.device)
            out[n] = LossWeights(nan, torch.zeros_like(nan), torch.zeros_like(nan))
        return out


class WeightsBadConstant(Plugin):
    """``constant`` given as a string instead of three numbers."""

    @hookimpl
    def collab_distill_loss_weights(self, records: Mapping[str, Knowledge]) -> dict[str, LossWeights]:
        out = {}
        for n, r in records.items():
            w = LossWeights.constant_weights(r.num_images, 1.0, 0.0, 0.0, r.logits.device)
            w.constant = "1, 0, 0"  # type: ignore[assignment]
            out[n] = w
        return out


# ---------------------------------------------------------------------------- targets


class TargetsWrongClasses(Plugin):
    """A KD target over 3 classes for a 10-class student (and beta 1 so that it is used)."""

    @hookimpl
    def collab_distill_loss_weights(self, records: Mapping[str, Knowledge]) -> dict[str, LossWeights]:
        return {n: LossWeights.constant_weights(r.num_images, 1.0, 1.0, 0.0, r.logits.device) for n, r in records.items()}

    @hookimpl
    def collab_distill_soft_targets(self, records: Mapping[str, Knowledge]) -> dict[str, SoftTarget]:
        return {n: SoftTarget(torch.full((r.logits.shape[0], 3), 1 / 3, device=r.logits.device)) for n, r in records.items()}


class TargetsNotAMapping(Plugin):
    """``soft_targets`` answers a bare tensor instead of ``{student: SoftTarget}``."""

    @hookimpl
    def collab_distill_loss_weights(self, records: Mapping[str, Knowledge]) -> dict[str, LossWeights]:
        return {n: LossWeights.constant_weights(r.num_images, 1.0, 1.0, 0.0, r.logits.device) for n, r in records.items()}

    @hookimpl
    def collab_distill_soft_targets(self, records: Mapping[str, Knowledge]) -> Any:
        first = next(iter(records.values()))
        return torch.softmax(first.logits.detach(), dim=-1)


class TargetsNaN(Plugin):
    """A KD target full of NaN."""

    @hookimpl
    def collab_distill_loss_weights(self, records: Mapping[str, Knowledge]) -> dict[str, LossWeights]:
        return {n: LossWeights.constant_weights(r.num_images, 1.0, 1.0, 0.0, r.logits.device) for n, r in records.items()}

    @hookimpl
    def collab_distill_soft_targets(self, records: Mapping[str, Knowledge]) -> dict[str, SoftTarget]:
        return {n: SoftTarget(torch.full_like(r.logits.detach(), float("nan"))) for n, r in records.items()}


class ConsensusWithGraph(Plugin):
    """A consensus target that is a plain list of probabilities (not a SoftTarget), gamma 1."""

    @hookimpl
    def collab_distill_loss_weights(self, records: Mapping[str, Knowledge]) -> dict[str, LossWeights]:
        return {n: LossWeights.constant_weights(r.num_images, 1.0, 0.0, 1.0, r.logits.device) for n, r in records.items()}

    @hookimpl
    def collab_distill_consensus_targets(self, records: Mapping[str, Knowledge]) -> Any:
        return {n: torch.softmax(r.logits.detach(), dim=-1).tolist() for n, r in records.items()}


# ---------------------------------------------------------------------------- losses


class AuxiliaryNotScalar(Plugin):
    """An auxiliary loss that is a ``[B]`` vector, not a scalar."""

    @hookimpl
    def collab_distill_auxiliary_losses(self, records: Mapping[str, Knowledge]) -> dict[str, torch.Tensor]:
        return {f"{n}/extra": r.logits.pow(2).mean(dim=1) for n, r in records.items()}


class AuxiliaryNotATensor(Plugin):
    """An auxiliary loss that is a Python float."""

    @hookimpl
    def collab_distill_auxiliary_losses(self, records: Mapping[str, Knowledge]) -> dict[str, Any]:
        return {f"{n}/extra": 0.5 for n in records}


class AuxiliaryNaN(Plugin):
    """An auxiliary loss that is NaN from the first step on."""

    @hookimpl
    def collab_distill_auxiliary_losses(self, records: Mapping[str, Knowledge]) -> dict[str, torch.Tensor]:
        return {f"{n}/extra": r.logits.sum() * float("nan") for n, r in records.items()}


class AuxiliaryUndeclaredParameter(Plugin):
    """An auxiliary loss through a trainable layer the plugin owns but never declares
    (neither ``student_modules`` nor ``meta_modules``): it would never be optimised."""

    def __init__(self) -> None:
        self.head = nn.Linear(10, 1)

    @hookimpl
    def collab_distill_auxiliary_losses(self, records: Mapping[str, Knowledge]) -> dict[str, torch.Tensor]:
        return {f"{n}/extra": self.head.to(r.logits.device)(r.logits).pow(2).mean() for n, r in records.items()}


class AuxiliaryUnknownStudent(Plugin):
    """An auxiliary loss named after a student that does not exist (``ghost/extra``)."""

    @hookimpl
    def collab_distill_auxiliary_losses(self, records: Mapping[str, Knowledge]) -> dict[str, torch.Tensor]:
        first = next(iter(records.values()))
        return {"ghost/extra": first.logits.pow(2).mean() * 0.0}


class TermsReservedName(Plugin):
    """Declares a per-image loss term named ``loss`` (a reserved name)."""

    @hookimpl
    def collab_distill_declare_loss_terms(self) -> list[str]:
        return ["loss"]


class TermsBadName(Plugin):
    """Declares a per-image loss term whose name has a space and a slash."""

    @hookimpl
    def collab_distill_declare_loss_terms(self) -> list[str]:
        return ["my term/x"]


class TermsDeclaredAsString(Plugin):
    """Declares its terms as one string (``"hint"``), not a list of names."""

    @hookimpl
    def collab_distill_declare_loss_terms(self) -> Any:
        return "hint"


class TermsWrongShape(Plugin):
    """Declares a term ``hint`` and returns it as a scalar instead of ``[B]``."""

    @hookimpl
    def collab_distill_declare_loss_terms(self) -> list[str]:
        return ["hint"]

    @hookimpl
    def collab_distill_loss_terms(self, records: Mapping[str, Knowledge]) -> dict[str, dict[str, torch.Tensor]]:
        return {n: {"hint": r.logits.pow(2).mean()} for n, r in records.items()}


class TermsUndeclared(Plugin):
    """Returns a per-image term ``surprise`` it never declared."""

    @hookimpl
    def collab_distill_loss_terms(self, records: Mapping[str, Knowledge]) -> dict[str, dict[str, torch.Tensor]]:
        return {n: {"surprise": r.logits.pow(2).mean(dim=1)} for n, r in records.items()}


# ---------------------------------------------------------------------------- modules and features


class MetaModuleNotWrapped(Plugin):
    """``meta_modules`` answers a bare ``nn.Linear`` instead of ``MetaModule(name, module)``."""

    @hookimpl
    def collab_distill_meta_modules(self) -> Any:
        return [nn.Linear(4, 2)]


class MetaModuleDuplicateName(Plugin):
    """Two meta modules named ``net``."""

    @hookimpl
    def collab_distill_meta_modules(self) -> list[MetaModule]:
        return [MetaModule("net", nn.Linear(4, 2)), MetaModule("net", nn.Linear(4, 2))]


class MetaModuleWithoutParameters(Plugin):
    """A meta module with no parameters at all (``nn.ReLU``): its optimizer has nothing to optimise."""

    @hookimpl
    def collab_distill_meta_modules(self) -> list[MetaModule]:
        return [MetaModule("relu", nn.ReLU())]


class _MetaWeights(Plugin):
    """Per-image weights from a meta-learned linear layer on the student's logits."""

    def __init__(self) -> None:
        self.net = nn.Linear(10, 1)

    @hookimpl
    def collab_distill_meta_modules(self) -> list[MetaModule]:
        return [MetaModule("w", self.net)]

    @hookimpl
    def collab_distill_loss_weights(self, engine: Any, records: Mapping[str, Knowledge]) -> dict[str, LossWeights]:
        net = engine.meta_modules["w"]
        out = {}
        for n, r in records.items():
            a = torch.sigmoid(net(r.logits.detach())).squeeze(1)
            out[n] = LossWeights(a, torch.zeros_like(a), torch.zeros_like(a))
        return out


class MetaObjectiveNotScalar(_MetaWeights):
    """A meta objective that is a ``[B]`` vector, not a scalar."""

    @hookimpl
    def collab_distill_meta_objective(self, records: Mapping[str, Knowledge]) -> torch.Tensor:
        return sum(r.supervised_loss for r in records.values())  # type: ignore[return-value]


class MetaObjectiveNaN(_MetaWeights):
    """A meta objective that is NaN."""

    @hookimpl
    def collab_distill_meta_objective(self, records: Mapping[str, Knowledge]) -> torch.Tensor:
        return sum(r.supervised_loss.mean() for r in records.values()) * float("nan")  # type: ignore[return-value]


class MetaObjectiveDetached(_MetaWeights):
    """A meta objective without a graph (a Python float turned into a tensor)."""

    @hookimpl
    def collab_distill_meta_objective(self, records: Mapping[str, Knowledge]) -> torch.Tensor:
        return torch.tensor(float(sum(r.supervised_loss.mean() for r in records.values())))


class FeatureUnknownPath(Plugin):
    """Asks for module ``layer9`` of student ``s`` (a ResNet has layer1-4)."""

    @hookimpl
    def collab_distill_feature_requests(self) -> list[FeatureRequest]:
        return [FeatureRequest("s", "layer9")]


class FeatureUnknownMember(Plugin):
    """Asks for ``layer1`` of a member ``ghost`` that is not in the cohort."""

    @hookimpl
    def collab_distill_feature_requests(self) -> list[FeatureRequest]:
        return [FeatureRequest("ghost", "layer1")]


class FeatureAsStrings(Plugin):
    """Answers ``feature_requests`` with bare module paths (``["layer3"]``), not FeatureRequests."""

    @hookimpl
    def collab_distill_feature_requests(self) -> Any:
        return ["layer3"]


class StudentModuleUnknownStudent(Plugin):
    """Attaches a module to a student ``ghost`` that does not exist."""

    @hookimpl
    def collab_distill_student_modules(self) -> dict[str, dict[str, nn.Module]]:
        return {"ghost": {"head": nn.Linear(4, 4)}}


class StudentModuleNotAModule(Plugin):
    """Attaches the number 3 as a module to student ``s``."""

    @hookimpl
    def collab_distill_student_modules(self) -> Any:
        return {"s": {"head": 3}}


# ---------------------------------------------------------------------------- events that fail


class ConfigureRefuses(Plugin):
    """Validates its settings in ``configure`` and refuses them, as the hook's contract says."""

    @hookimpl
    def collab_distill_configure(self) -> None:
        raise ConfigError("ConfigureRefuses.threshold=-1 must be >= 0; set threshold: 0.5")


class ConfigureRaisesValueError(Plugin):
    """A bug in ``configure``: ``int("abc")``."""

    @hookimpl
    def collab_distill_configure(self) -> None:
        int("abc")


class FitStartRaises(Plugin):
    """``fit_start`` raises (a file the plugin wants is missing)."""

    @hookimpl
    def collab_distill_fit_start(self) -> None:
        raise FileNotFoundError("/nowhere/plugin_state.json")


class EpochEndRaises(Plugin):
    """``epoch_end`` raises after the first epoch."""

    @hookimpl
    def collab_distill_epoch_end(self, epoch: int) -> None:
        raise RuntimeError(f"cannot summarise epoch {epoch}")


class FitEndRaises(Plugin):
    """``fit_end`` raises (results.json has been written by then)."""

    @hookimpl
    def collab_distill_fit_end(self) -> None:
        raise RuntimeError("cannot upload the results")


class EvaluationEndRaises(Plugin):
    """``evaluation_end`` raises (also in ``validate``/``test``)."""

    @hookimpl
    def collab_distill_evaluation_end(self, split: str) -> None:
        raise KeyError(split)


class SaveStateUnpicklable(Plugin):
    """Puts a lambda into the checkpoint (torch.save cannot pickle it)."""

    @hookimpl
    def collab_distill_save_state(self, state: dict[str, Any]) -> None:
        state["unpicklable"] = {"fn": lambda x: x}


class SaveStateClobbers(Plugin):
    """Overwrites every key of the checkpoint state it is handed: the engine hands plugins a dict
    of plugin state only, so what it clobbers is the state of the plugins called before it."""

    @hookimpl
    def collab_distill_save_state(self, state: dict[str, Any]) -> None:
        for key in list(state):
            state[key] = "clobbered"
        state["clobbered"] = True


class SavesItsState(Plugin):
    """A sound plugin that keeps a counter under its own key (``SaveStateClobbers`` overwrites it)."""

    @hookimpl
    def collab_distill_save_state(self, state: dict[str, Any]) -> None:
        state["saves_its_state"] = {"count": 1}


class LoadStateRaises(Plugin):
    """``load_state`` (on ``--resume``) raises: its key is not in the checkpoint."""

    @hookimpl
    def collab_distill_load_state(self, state: Mapping[str, Any]) -> None:
        state["load_state_raises"]  # noqa: B018 - the bug is the lookup


class ReportSectionsWrongType(Plugin):
    """``report_sections`` answers a string instead of a list of ReportSection."""

    @hookimpl
    def collab_distill_report_sections(self) -> Any:
        return "see the logs"


class ReportFigureOutsideRun(Plugin):
    """A report section whose figure lies outside the run folder."""

    @hookimpl
    def collab_distill_report_sections(self) -> list[ReportSection]:
        return [ReportSection("escape", "text", figures=["../../../etc/passwd"])]


# ---------------------------------------------------------------------------- ending the process


class ExitsInConfigure(Plugin):
    """``sys.exit(0)`` in ``configure``, before any work."""

    @hookimpl
    def collab_distill_configure(self) -> None:
        sys.exit(0)


class ExitsInFitEnd(Plugin):
    """``sys.exit(0)`` in ``fit_end``, after the results are written."""

    @hookimpl
    def collab_distill_fit_end(self) -> None:
        sys.exit(0)


class ExitsWithNone(Plugin):
    """``raise SystemExit`` (code None, i.e. 0) at the first training step."""

    @hookimpl
    def collab_distill_train_step_end(self, step: int) -> None:
        raise SystemExit


class RaisesBaseException(Plugin):
    """Raises a ``BaseException`` subclass (not an ``Exception``) at the first training step."""

    class Stop(BaseException):
        pass

    @hookimpl
    def collab_distill_train_step_end(self, step: int) -> None:
        raise self.Stop("stop here")


# ---------------------------------------------------------------------------- construction


class InitExits(Plugin):
    """``__init__`` calls ``sys.exit(3)``."""

    def __init__(self) -> None:
        sys.exit(3)


class RequiredArgument(Plugin):
    """A plugin with a required ``init_args`` field (``threshold``)."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold


class NotAPluginSubclass:
    """Hook implementations on a class that does not derive from ``Plugin``."""

    @hookimpl
    def collab_distill_fit_start(self) -> None:
        pass
