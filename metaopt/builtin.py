"""MAML's default behaviour, as an ordinary plugin whose hooks are all ``trylast``."""

from __future__ import annotations

import torch

from metaopt.hookspecs import hookimpl
from metaopt.inner_optim import diff_step
from metaopt.recompute import replayed_step
from metaopt.task import Batch, Params, Task, Trajectory

BUILTIN_PREFIX = "builtin:"


def classification_metrics(output: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """Accuracy for class-index targets; nothing for regression."""
    if target.dtype in (torch.int64, torch.int32) and output.dim() == 2 and output.shape[1] > 1:
        return {"accuracy": (output.argmax(dim=1) == target).float().mean().detach()}
    return {}


def query_loss(task: Task, params: Params) -> torch.Tensor:
    """Loss on the query set at ``params``; sets ``task.query_output`` and accuracy."""
    output = task.forward(task.query_x, params)
    task.query_output = output
    task.metrics.update(classification_metrics(output, task.query_y))
    return task.learner.loss_fn(output, task.query_y)


def gradient_adapt(task: Task, trajectory: Trajectory) -> Params:
    """The plain inner loop: ``trajectory.steps`` steps through the inner hooks."""
    hook = task.hook
    params = trajectory.iterates[0]
    replay = task.recompute and task.create_graph  # memory="recompute": one step's graph at a time
    for k in range(trajectory.steps):
        trajectory.k = k
        if replay:
            params = replayed_step(task, trajectory, params)
        else:
            grads = hook.inner_grad(task=task, params=params)
            params = hook.inner_step(task=task, trajectory=trajectory, params=params, grads=grads)
        trajectory.iterates.append(params)
        hook.after_inner_step(task=task, trajectory=trajectory, params=params)
    return params


class MAMLDefaults:
    """Second-order MAML (first-order when the learner says so): the loop's defaults."""

    name = BUILTIN_PREFIX + "maml"

    @hookimpl(trylast=True)
    def adapted_params(self, learner, candidates: list[str]) -> list[str]:
        return list(candidates)

    @hookimpl(trylast=True)
    def adapt(self, task: Task, trajectory: Trajectory) -> Params:
        return gradient_adapt(task, trajectory)

    @hookimpl(trylast=True)
    def inner_loss(self, task: Task, params: Params) -> torch.Tensor:
        return task.learner.loss_fn(task.forward(task.support_x, params), task.support_y)

    @hookimpl(trylast=True)
    def inner_grad(self, task: Task, params: Params) -> Params:
        return task.inner_grad_at(params)

    @hookimpl(trylast=True)
    def inner_step(self, task: Task, trajectory: Trajectory, params: Params, grads: Params) -> Params:
        names = list(params)
        new = diff_step(trajectory.optimizer, list(params.values()), [grads[n] for n in names], trajectory.lr)
        return dict(zip(names, new, strict=True))

    @hookimpl(trylast=True)
    def outer_loss(self, task: Task, params: Params) -> torch.Tensor:
        return query_loss(task, params)

    @hookimpl(trylast=True)
    def outer_step(self, batch: Batch) -> bool:
        if not batch.backward_per_task:  # else run_tasks already backpropagated every task
            assert batch.meta_loss is not None
            batch.backward(batch.meta_loss)
        return True
