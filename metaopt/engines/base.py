"""The seam between the learner and its engines: what an engine gets, and the one task body.

An engine runs a :class:`~metaopt.task.Batch` with an :class:`EngineContext` (the learner's
public pieces, gathered once by the learner) and returns the batch's mean meta-loss; per-task
results go on the batch (``batch.tasks`` or ``batch.stacked``).  Engines never see the learner
itself, and :func:`run_task` — the hook sequence of one task — is the same for every engine.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from metaopt.errors import ConfigError, suggest
from metaopt.task import Batch, Params, Task, TaskData, TrajectoryFactory

ENGINES = ("loop", "vmap", "compile", "auto")


def check_engine(engine: str) -> None:
    if engine not in ENGINES:
        raise ConfigError(f"engine={engine!r} is not known; use one of {ENGINES}.{suggest(engine, ENGINES)}")


@dataclass
class EngineContext:
    """The learner's public pieces an engine may use (built once per learner)."""

    learner: Any  # only handed on to Task.learner / Batch.learner for plugins; engines never call it
    model: nn.Module
    hook: Any
    backend: Any
    trajectories: TrajectoryFactory
    plugins: list[tuple[str, object]]
    adapted_names: list[str]
    first_order: bool
    inner_optimizer_name: str
    inner_optimizer_kwargs: dict[str, Any]
    uses_momentum: bool
    task_chunk: int | None
    finite_check: Any
    device: Callable[[], torch.device]
    autocast: Callable[[], contextlib.AbstractContextManager[Any]]
    memory: str = "keep"
    meta_parameters: Callable[[], list[torch.Tensor]] = list
    #: the module holding every meta-parameter (names, and the compile gate's float64 round trip)
    holder: nn.Module | None = None
    #: whether ``batch.backward(loss)`` is plain ``loss.backward()`` (no accelerator scaling the loss): then
    #: an engine that already holds a chunk's meta-gradient may put it into ``.grad`` itself
    plain_backward: Callable[[], bool] = bool
    #: the relay a vectorised task (``engine="vmap"``/``"compile"``) calls: ``hook`` without the finite
    #: check's per-hook wrappers, which are suspended inside vmap (the engine checks each task's loss);
    #: None: ``hook``
    vectorised_hook: Any = None

    def start_params(self, training: bool, named: Params | None = None) -> Params:
        """The adapted parameters' starting point: the meta-parameters (evaluation: detached copies)."""
        named = dict(self.model.named_parameters()) if named is None else named
        if training:
            return {n: named[n] for n in self.adapted_names}
        return {n: named[n].detach().requires_grad_() for n in self.adapted_names}


class Engine(Protocol):
    name: str

    def run(self, batch: Batch, ctx: EngineContext) -> torch.Tensor:
        """Run every task of ``batch``; return the mean meta-loss (per-task results on the batch)."""
        ...


def make_task(
    ctx: EngineContext,
    index: int | None,
    data: TaskData | tuple[torch.Tensor, ...],
    training: bool,
    start: Params,
    *,
    backend: Any = None,
    vectorised: bool = False,
) -> Task:
    """A task record wired to the context's hook relay, backend and trajectory factory."""
    sx, sy, qx, qy = data
    return Task(
        learner=ctx.learner,
        index=index,
        support_x=sx,
        support_y=sy,
        query_x=qx,
        query_y=qy,
        start=start,
        training=training,
        second_order=not ctx.first_order,
        vectorised=vectorised,
        hook=ctx.vectorised_hook if vectorised and ctx.vectorised_hook is not None else ctx.hook,
        backend=ctx.backend if backend is None else backend,
        trajectories=ctx.trajectories,
        recompute=ctx.memory == "recompute",
        meta_params=ctx.meta_parameters() if ctx.memory == "recompute" and training else [],
    )


def run_task(task: Task) -> torch.Tensor:
    """One task through the hooks: start, adapt, outer loss, loss modification, end."""
    hook = task.hook
    hook.task_start(task=task)
    trajectory = task.trajectories.new(task, None)
    task.trajectory = trajectory
    task.params = hook.adapt(task=task, trajectory=trajectory)
    loss = hook.outer_loss(task=task, params=task.params)
    task.metrics["query_loss"] = loss.detach()
    if task.training:
        for terms in hook.loss_modification(task=task, params=task.params, loss=loss):
            for name, term in (terms or {}).items():
                loss = loss + term
                task.metrics[name] = term.detach()
    task.loss = loss
    hook.task_end(task=task)
    return loss
