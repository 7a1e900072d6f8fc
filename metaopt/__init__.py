"""metaopt: plugin-based gradient meta-learning for existing PyTorch trainers."""

from metaopt.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    MetaOptError,
    PluginConflictError,
    PluginError,
)
from metaopt.hookspecs import hookimpl
from metaopt.learner import BatchResult, MetaLearner
from metaopt.models import HeadedModel, create_model, list_models
from metaopt.optim import NormalizedSGD
from metaopt.registry import create_plugin, list_plugins, register_plugin
from metaopt.stash import Stash, StashKey
from metaopt.task import Batch, Params, Task, TaskData, Trajectory

__version__ = "0.1.0"

__all__ = [
    "Batch",
    "BatchResult",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "HeadedModel",
    "MetaLearner",
    "MetaOptError",
    "NormalizedSGD",
    "Params",
    "PluginConflictError",
    "PluginError",
    "Stash",
    "StashKey",
    "Task",
    "TaskData",
    "Trajectory",
    "create_model",
    "create_plugin",
    "hookimpl",
    "list_models",
    "list_plugins",
    "register_plugin",
]
