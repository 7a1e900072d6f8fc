"""``engine="auto"``: which engine runs a batch, and why vmap cannot run a learner."""

from __future__ import annotations

from torch import nn

from metaopt.engines.base import EngineContext
from metaopt.task import TaskData

FIELDS = TaskData._fields
#: inner optimizers whose state lives in ``higher`` optimizers (in-place state, not vmap-safe)
HIGHER_OPTIMIZERS = ("higher_adam", "rmsprop", "adagrad")
CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def has_convolutions(model: nn.Module) -> bool:
    """Whether any module of ``model`` is a convolution: on CPU their batched (grouped) kernels under
    vmap are slower than one convolution per task, which ``auto`` and the compile engine go by."""
    return any(isinstance(m, CONV_MODULES) for m in model.modules())


def vmap_refusals(ctx: EngineContext) -> list[str]:
    """Why this learner cannot run under ``engine="vmap"`` (empty: it can), one reason each."""
    reasons = []
    for name, plugin in ctx.plugins:
        reason = getattr(plugin, "vmap_unsupported", None)
        if reason:
            reasons.append(f"plugin {name!r}: {reason}")
    if ctx.inner_optimizer_name in HIGHER_OPTIMIZERS or ctx.uses_momentum:
        reasons.append(
            f"inner_optimizer={ctx.inner_optimizer_name!r} with {ctx.inner_optimizer_kwargs}: higher's "
            "differentiable optimizers keep their state in place, which vmap cannot batch (use 'sgd' or 'adam')"
        )
    return reasons


def compile_refusals(ctx: EngineContext) -> list[str]:
    """Why ``engine="compile"`` cannot run this learner, beyond :func:`vmap_refusals`."""
    reasons = [
        f"plugin {name!r}: {reason}"
        for name, plugin in ctx.plugins
        if (reason := getattr(plugin, "compile_unsupported", None))
    ]
    if ctx.memory == "recompute":
        reasons.append(
            "memory='recompute' makes each inner step an autograd.Function with a vmap rule, which torch.compile "
            "does not trace; use engine='vmap' (recompute runs there) or memory='keep'"
        )
    return reasons


def ragged(data: list[TaskData]) -> str | None:
    """A description of the first shape that differs between tasks, or None when all stack."""
    for field_index, field in enumerate(FIELDS):
        first = data[0][field_index]
        shape, dtype = first.shape, first.dtype
        for i, task in enumerate(data[1:], 1):
            other = task[field_index]
            if other.shape != shape or other.dtype != dtype:
                return (
                    f"{field} of task 0 is {tuple(first.shape)} {first.dtype} but of task {i} "
                    f"{tuple(other.shape)} {other.dtype}"
                )
    return None


def unvetted_plugins(ctx: EngineContext) -> list[str]:
    """Plugins that are neither built in nor declare ``vmap_safe = True`` (auto keeps them in the loop)."""
    return [
        name
        for name, plugin in ctx.plugins
        if not name.startswith("builtin:") and not getattr(plugin, "vmap_safe", False)
    ]


def auto_engine(ctx: EngineContext) -> str:
    """What ``engine="auto"`` picks for this learner whenever the tasks of a batch stack (the
    trainer's samplers always give such batches).

    Measured on CPU (docs/benchmarks/speed.md): vmap is several times faster on the
    overhead-bound sinusoid MLP and slower on conv4 / ResNets, where the per-task loop's
    convolutions are the faster kernels.  The loop whenever vmap cannot run the learner (a
    refused plugin or optimizer), and with a third-party plugin that does not declare
    ``vmap_safe = True`` (it may call ``torch.autograd.grad`` or read values).
    """
    if vmap_refusals(ctx) or unvetted_plugins(ctx):
        return "loop"
    return "loop" if has_convolutions(ctx.model) else "vmap"


def choose_engine(ctx: EngineContext, data: list[TaskData]) -> str:
    """``engine="auto"`` for one batch: :func:`auto_engine`, or the loop for ragged tasks."""
    return "loop" if ragged(data) is not None else auto_engine(ctx)
