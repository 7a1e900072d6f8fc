"""The accelerate bridge: devices, mixed precision and the outer backward.

``prepare(learner, accelerator)`` moves the learner (model and plugin modules) to the
accelerator's device and routes the outer backward through ``accelerator.backward`` and
every forward through ``accelerator.autocast()``.  Multi-process synchronisation of the
meta-gradient is not handled here yet (see docs/accelerate.md).
"""

from __future__ import annotations

from typing import Any

from metaopt.errors import ConfigError
from metaopt.learner import MetaLearner

SUPPORTED_PRECISION = ("no", "bf16")


def make_accelerator(precision: str = "no", cpu: bool = False) -> Any:
    """An ``Accelerator`` for single-process runs; fp16 is refused (inner grads are unscaled)."""
    from accelerate import Accelerator

    if precision == "fp16":
        raise ConfigError(
            "mixed precision 'fp16' is not supported: the inner-loop gradients are not loss-scaled and "
            "underflow. Use precision='bf16' (same speed on recent hardware, no scaling needed)."
        )
    if precision not in SUPPORTED_PRECISION:
        raise ConfigError(f"precision={precision!r} must be one of {SUPPORTED_PRECISION}.")
    return Accelerator(mixed_precision=precision, cpu=cpu)


def prepare(learner: MetaLearner, accelerator: Any) -> MetaLearner:
    """Attach ``accelerator`` to ``learner`` and move it to the accelerator's device."""
    if accelerator.num_processes > 1:
        raise ConfigError(
            f"{accelerator.num_processes} processes: multi-process meta-gradient synchronisation is not "
            "implemented yet; run with one process."
        )
    if accelerator.mixed_precision == "fp16":
        raise ConfigError("mixed precision 'fp16' is not supported by metaopt; use 'bf16'.")
    learner.to(accelerator.device)
    learner.accelerator = accelerator
    return learner
