"""Intermediate outputs of any cohort member, by module path, without editing the model.

A plugin asks for features through the ``collab_distill_feature_requests`` hook; the engine
registers one forward hook per requested module and fills ``Knowledge.features[name]`` on the
steps where some request is active. Hooks store nothing on other steps, so evaluation and
steps that need no feature cost a flag test per hooked module.

A request names a module path as ``named_modules()`` spells it (``layer3``,
``backbone.fpn``, ``heads.0.body``), optionally followed by ``[key]`` to pick one item of the
module's output: ``backbone.fpn[1]`` is torchvision's second FPN level, ``backbone[p4]`` is
detectron2's ``p4``. ``[0]`` on a tuple output takes its first element.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterator, Mapping
from collections.abc import Mapping as MappingABC
from collections.abc import Sequence as SequenceABC
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from torch import Tensor, nn

from collab_distill.task import ConfigError

if TYPE_CHECKING:
    from collab_distill.engine_view import EngineView

__all__ = ["FeatureRequest", "FeatureCapture", "parse_feature", "nearest_module_paths"]

_SPEC = re.compile(r"^(?P<path>[^\[\]]*)(\[(?P<key>[^\[\]]+)\])?$")


def parse_feature(spec: str) -> tuple[str, Optional[str]]:
    """``"backbone.fpn[1]"`` -> ``("backbone.fpn", "1")``; ``"layer3"`` -> ``("layer3", None)``."""
    match = _SPEC.match(spec.strip())
    if match is None:
        raise ConfigError(f"feature {spec!r}: write a module path, optionally followed by [key], e.g. layer3 or backbone.fpn[1]")
    return match["path"], match["key"]


@dataclass(frozen=True)
class FeatureRequest:
    """One named intermediate output of one cohort member.

    Args:
        member: a student's or a teacher's name.
        feature: module path, optionally with ``[key]`` (see the module docstring). The captured
            tensor appears as ``record.features[feature]``.
        when: optional ``when(engine, phase) -> bool``; the feature is captured only where it
            returns True, e.g. not during a warm-up. ``phase`` is ``"train"`` (the real step; the
            teachers' records too), ``"lookahead"`` (the students in the bilevel step's lookahead)
            or ``"meta"`` (the looked-ahead students on the meta batch). Default: always.
    """

    member: str
    feature: str
    when: Optional[Callable[[EngineView, str], bool]] = None

    @property
    def path(self) -> str:
        return parse_feature(self.feature)[0]

    @property
    def key(self) -> Optional[str]:
        return parse_feature(self.feature)[1]


def nearest_module_paths(model: nn.Module, path: str, n: int = 5) -> list[str]:
    """The module paths of ``model`` closest to a (misspelled) ``path``."""
    names = [name for name, _ in model.named_modules() if name]
    close = difflib.get_close_matches(path, names, n=n, cutoff=0.5)
    if len(close) < n:  # also offer the paths under the longest valid prefix
        parts = path.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            prefix = ".".join(parts[:cut])
            children = [name for name in names if name.startswith(prefix + ".") and name.count(".") == cut]
            if children:
                close += [c for c in children if c not in close][: n - len(close)]
                break
    if not close:
        close = [name for name in names if "." not in name][:n]
    return close


def _select(output: Any, key: Optional[str], where: str) -> Tensor:
    if key is None:
        value = output
    elif isinstance(output, MappingABC):
        if key not in output:
            raise ConfigError(f"feature {where}: the module's output has keys {sorted(map(str, output))}, not {key!r}")
        value = output[key]
    elif isinstance(output, SequenceABC) and not isinstance(output, str):
        if not key.lstrip("-").isdigit() or not -len(output) <= int(key) < len(output):
            raise ConfigError(f"feature {where}: the module returns a sequence of {len(output)}; "
                              f"index it with [0]..[{len(output) - 1}]")
        value = output[int(key)]
    else:
        raise ConfigError(f"feature {where}: the module returns a {type(output).__name__}, which has no items; drop [{key}]")
    if not isinstance(value, Tensor):
        raise ConfigError(
            f"feature {where}: the module returns a {type(value).__name__}, not a tensor; "
            "pick a tensor item with [key] (a dict's key or a tuple's index)"
        )
    return value


class FeatureCapture:
    """Forward hooks on the requested modules of every member, recording only when asked.

    Hooks are registered on the user's module (not on Fabric's or DDP's wrapper), so they fire
    inside the wrapper's forward and inside ``torch.func.functional_call`` (the bilevel lookahead)
    alike, and capture the tensors of that very call, with their graph.
    """

    def __init__(self, models: Mapping[str, nn.Module], requests: list[FeatureRequest]) -> None:
        self.requests: dict[str, list[FeatureRequest]] = {}
        self._outputs: dict[str, dict[str, Any]] = {}
        self._recording: set[str] = set()
        self._handles: list[Any] = []
        for request in requests:
            if request.member not in models:
                raise ConfigError(
                    f"feature {request.feature!r} was requested of {request.member!r}, which is not a member of the cohort "
                    f"(students and teachers: {sorted(models)})"
                )
            model = models[request.member]
            path = request.path
            try:
                module = model.get_submodule(path) if path else model
            except AttributeError:
                nearest = nearest_module_paths(model, path)
                raise ConfigError(
                    f"feature {request.feature!r} of {request.member!r}: {type(model).__name__} has no module {path!r}; "
                    f"nearest valid paths: {', '.join(nearest)} (all: [name for name, _ in model.named_modules()])"
                ) from None
            known = self.requests.setdefault(request.member, [])
            if any(r.feature == request.feature for r in known):
                known.append(request)  # same tensor; another plugin's `when` may differ
                continue
            known.append(request)
            if path not in self._outputs.setdefault(request.member, {}):
                self._outputs[request.member][path] = None
                self._handles.append(module.register_forward_hook(self._hook(request.member, path)))

    def _hook(self, member: str, path: str) -> Callable[..., None]:
        outputs = self._outputs[member]
        recording = self._recording

        def store(module: nn.Module, args: Any, output: Any) -> None:
            if member in recording:
                outputs[path] = output

        return store

    def members(self) -> list[str]:
        return list(self.requests)

    def active(self, member: str, engine: EngineView, phase: str) -> list[str]:
        """The features of ``member`` some request wants in this step."""
        wanted = []
        for request in self.requests.get(member, ()):
            if request.feature not in wanted and (request.when is None or request.when(engine, phase)):
                wanted.append(request.feature)
        return wanted

    @contextmanager
    def recording(self, member: str, features: list[str]) -> Iterator[dict[str, Tensor]]:
        """Record ``member``'s hooked outputs during the block; the dict is filled on exit."""
        captured: dict[str, Tensor] = {}
        outputs = self._outputs[member]
        for path in outputs:
            outputs[path] = None
        self._recording.add(member)
        try:
            yield captured
        finally:
            self._recording.discard(member)
        for feature in features:
            path, key = parse_feature(feature)
            output = outputs[path]
            if output is None:
                raise RuntimeError(
                    f"feature {feature!r} of {member!r}: the module {path!r} did not run in this forward pass "
                    "(is it used by the model's forward in training mode?)"
                )
            captured[feature] = _select(output, key, f"{feature!r} of {member!r}")
        for path in outputs:
            outputs[path] = None  # do not keep graphs alive between steps

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
