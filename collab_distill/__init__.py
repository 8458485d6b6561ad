"""collab-distill: collaborative knowledge distillation on Lightning Fabric and pluggy.

The public API for plugin authors is importable from here: :data:`hookimpl`, :class:`Plugin`,
the records (:class:`Knowledge`, :class:`SoftTarget`, :class:`LossWeights`), :class:`MetaModule`
and :class:`ConfigError`.
"""

__version__ = "0.1.0"

from collab_distill.hookspecs import hookimpl
from collab_distill.meta import BilevelConfig, MetaModule
from collab_distill.plugin_manager import Plugin
from collab_distill.records import Knowledge, LossWeights, SoftTarget
from collab_distill.task import ConfigError, ModelFactory, Task, TaskInfo

__all__ = [
    "__version__",
    "hookimpl",
    "Plugin",
    "Knowledge",
    "LossWeights",
    "SoftTarget",
    "MetaModule",
    "BilevelConfig",
    "ConfigError",
    "ModelFactory",
    "Task",
    "TaskInfo",
]
