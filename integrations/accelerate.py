"""The accelerate bridge: devices, mixed precision and the outer backward.

``prepare(learner, accelerator)`` moves the learner (model and plugin modules) to the
accelerator's device and routes the outer backward through ``accelerator.backward`` and
every forward through ``accelerator.autocast()``.  With several processes the learner is not
wrapped in DDP: ``MetaLearner.backward`` averages the meta-gradient over processes itself
(one all-reduce per meta-iteration), each process adapting its own share of the tasks.
"""

from __future__ import annotations

from typing import Any

from metaopt.errors import ConfigError
from metaopt.learner import MetaLearner

SUPPORTED_PRECISION = ("no", "bf16")


def make_accelerator(precision: str = "no", cpu: bool = False) -> Any:
    """An ``Accelerator`` (one or several processes, as launched); fp16 is refused (inner grads are unscaled)."""
    from accelerate import Accelerator

    if precision == "fp16":
        raise ConfigError(
            "mixed precision 'fp16' is not supported: the inner-loop gradients are not loss-scaled and "
            "underflow. Use precision='bf16' (same speed on recent hardware, no scaling needed)."
        )
    if precision not in SUPPORTED_PRECISION:
        raise ConfigError(f"precision={precision!r} must be one of {SUPPORTED_PRECISION}.")
    from accelerate.state import AcceleratorState

    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision", precision) != precision:
        # accelerate keeps one process-wide state; a new run with another precision replaces it
        # (the distributed PartialState is kept).
        AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(mixed_precision=precision, cpu=cpu)


def prepare(learner: MetaLearner, accelerator: Any) -> MetaLearner:
    """Attach ``accelerator`` to ``learner`` and move it to the accelerator's device.

    Use this instead of ``accelerator.prepare(learner)``: the learner must not be wrapped in
    DDP (see the module docstring).  Prepare your optimizer with ``accelerator.prepare`` as usual.
    """
    if accelerator.mixed_precision == "fp16":
        raise ConfigError("mixed precision 'fp16' is not supported by metaopt; use 'bf16'.")
    learner.to(accelerator.device)
    learner.accelerator = accelerator
    return learner
