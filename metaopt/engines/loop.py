"""``engine="loop"``: the tasks of a batch one after the other, through the learner's backend."""

from __future__ import annotations

import torch

from metaopt.engines.base import EngineContext, make_task, run_task
from metaopt.task import Batch, Task, upcast


class LoopEngine:
    """Task after task; with ``batch.backward_per_task`` each task is backpropagated as it ends,
    so one task's graph is in memory at a time."""

    name = "loop"

    def run(self, batch: Batch, ctx: EngineContext) -> torch.Tensor:
        ctx.backend.prepare(batch.training)
        batch.tasks, batch.stacked, batch.make_tasks = [], None, None
        losses = []
        try:
            with torch.enable_grad():
                device, named = ctx.device(), dict(ctx.model.named_parameters())  # once per batch
                for i, data in enumerate(batch.data):
                    moved = tuple(t.to(device, non_blocking=True) for t in data)
                    task = make_task(ctx, i, moved, batch.training, ctx.start_params(batch.training, named))
                    batch.tasks.append(task)
                    with ctx.autocast():
                        loss = run_task(task)
                    if batch.backward_per_task:  # outside autocast, as torch.amp advises
                        batch.backward(upcast(loss) / len(batch.data))
                        loss = loss.detach()
                        if ctx.memory == "recompute":
                            release_spent_graph(task)
                    losses.append(loss)
        finally:
            ctx.backend.release()
        batch.meta_loss = torch.stack([upcast(loss) for loss in losses]).mean()
        return batch.meta_loss


def release_spent_graph(task: Task) -> None:
    """After a task's own backward: its record keeps the same values, cut from the spent graph.

    The graph's buffers are gone once backpropagated, but its nodes stay reachable from the task's
    loss, parameters and inner iterates until the batch ends; with ``memory="recompute"`` each
    step's node holds its saved random state and closure, which grew the batch's memory with K.
    """
    cut = lambda params: {n: p.detach() for n, p in params.items()}  # noqa: E731
    if task.trajectory is not None:
        task.trajectory.iterates = [cut(params) for params in task.trajectory.iterates]
    if task.params is not None:
        task.params = cut(task.params)
    for field in ("loss", "query_output"):
        value = getattr(task, field)
        if isinstance(value, torch.Tensor):
            setattr(task, field, value.detach())
