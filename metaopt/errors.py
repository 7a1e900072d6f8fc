"""One error hierarchy for metaopt: every message names the value received and the fix."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class MetaOptError(Exception):
    """Base class of every error metaopt raises on purpose."""


class ConfigError(MetaOptError, ValueError):
    """A setting, option or argument has a value that cannot work."""


class PluginError(MetaOptError):
    """A plugin is unknown, malformed, or failed inside one of its hooks."""


class PluginConflictError(PluginError):
    """Two plugins cannot be combined (both replace one hook, or declared incompatible)."""


class PluginHookError(PluginError):
    """An exception escaped a plugin's hook; ``plugin``, ``hook`` and ``task`` say where."""

    def __init__(self, message: str, *, plugin: str, hook: str, task: int | None = None) -> None:
        super().__init__(message)
        self.plugin, self.hook, self.task = plugin, hook, task


class NumericalError(MetaOptError, FloatingPointError):
    """A loss or gradient became NaN or infinite; says at which iteration, task and hook."""

    def __init__(self, message: str, *, iteration: int, hook: str, task: int | None = None) -> None:
        super().__init__(message)
        self.iteration, self.hook, self.task = iteration, hook, task


class TrainingInterrupted(MetaOptError):
    """Training stopped on SIGINT/SIGTERM after writing a checkpoint."""

    def __init__(self, message: str, *, signal_number: int) -> None:
        super().__init__(message)
        self.signal_number = signal_number


class DataError(MetaOptError, ValueError):
    """A data source or task does not have the shape, size or content required."""


class CheckpointError(MetaOptError):
    """A checkpoint cannot be written, read, or does not match the learner."""


def suggest(value: str, choices: Iterable[str]) -> str:
    """Return ' Did you mean X?' for the nearest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(value, list(choices), n=3, cutoff=0.6)
    if not close:
        return ""
    return " Did you mean " + " or ".join(repr(c) for c in close) + "?"
