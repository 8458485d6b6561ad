"""collab-distill: collaborative knowledge distillation on Lightning Fabric and pluggy.

The public API for plugin authors is importable from here: :data:`hookimpl`, :class:`Plugin`,
the records (:class:`Knowledge`, :class:`SoftTarget`, :class:`TargetSet`, :class:`LossWeights`)
and their helpers (:func:`mean_of_teachers`, :func:`per_image_mean`), :class:`FeatureRequest`,
:class:`MetaModule`, :class:`EngineView` (what a plugin may read from the engine),
:func:`unwrap`, :class:`ConfigError` and :class:`PluginError` (a hook implementation raised).
Test helpers are in :mod:`collab_distill.testing`.
"""

__version__ = "0.1.0"

from collab_distill.engine_view import EngineView
from collab_distill.features import FeatureRequest
from collab_distill.hookspecs import hookimpl
from collab_distill.meta import BilevelConfig, MetaModule
from collab_distill.plugin_manager import Plugin, PluginError
from collab_distill.records import Knowledge, LossWeights, SoftTarget, TargetSet, mean_of_teachers, per_image_mean
from collab_distill.report import ReportSection
from collab_distill.task import ConfigError, ModelFactory, Task, TaskInfo
from collab_distill.wrapping import unwrap

__all__ = [
    "__version__",
    "hookimpl",
    "Plugin",
    "PluginError",
    "Knowledge",
    "LossWeights",
    "SoftTarget",
    "TargetSet",
    "mean_of_teachers",
    "per_image_mean",
    "FeatureRequest",
    "EngineView",
    "unwrap",
    "MetaModule",
    "BilevelConfig",
    "ConfigError",
    "ModelFactory",
    "Task",
    "TaskInfo",
    "ReportSection",
]
