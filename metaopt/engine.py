"""Execution engines: every task of a meta-batch one after the other, or all at once.

``loop`` runs the hooks task by task (the learner's backend: ``higher`` or ``torch.func``).
``vmap`` runs the same hooks once, inside ``torch.func.vmap`` over the task dimension: a hook
sees one task's tensors (per-task views), inner gradients come from ``torch.func.grad``
(through ``task.grad``), the model runs through ``functional_call``, and the outer backward
is one call per chunk of tasks.  ``auto`` picks one per batch (:func:`choose_engine`).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from metaopt.backend import TorchFuncBackend
from metaopt.errors import ConfigError, DataError, suggest
from metaopt.norms import SafeNorms
from metaopt.task import Batch, Task, TaskData, upcast

if TYPE_CHECKING:
    from metaopt.learner import MetaLearner

ENGINES = ("loop", "vmap", "auto")
FIELDS = TaskData._fields
#: inner optimizers whose state lives in ``higher`` optimizers (in-place state, not vmap-safe)
HIGHER_OPTIMIZERS = ("higher_adam", "rmsprop", "adagrad")
CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def check_engine(engine: str) -> None:
    if engine not in ENGINES:
        raise ConfigError(f"engine={engine!r} is not known; use one of {ENGINES}.{suggest(engine, ENGINES)}")


def vmap_refusals(learner: MetaLearner) -> list[str]:
    """Why this learner cannot run under ``engine="vmap"`` (empty: it can), one reason each."""
    reasons = []
    for name, plugin in zip(learner.host.names, learner.host.plugins, strict=True):
        reason = getattr(plugin, "vmap_unsupported", None)
        if reason:
            reasons.append(f"plugin {name!r}: {reason}")
    uses_momentum = any(g.get("momentum") for g in learner._template.param_groups)
    if learner.inner_optimizer_name in HIGHER_OPTIMIZERS or uses_momentum:
        reasons.append(
            f"inner_optimizer={learner.inner_optimizer_name!r} with {learner.inner_optimizer_kwargs}: higher's "
            "differentiable optimizers keep their state in place, which vmap cannot batch (use 'sgd' or 'adam')"
        )
    return reasons


def ragged(data: list[TaskData]) -> str | None:
    """A description of the first shape that differs between tasks, or None when all stack."""
    for field_index, field in enumerate(FIELDS):
        first = data[0][field_index]
        for i, task in enumerate(data[1:], 1):
            other = task[field_index]
            if other.shape != first.shape or other.dtype != first.dtype:
                return (
                    f"{field} of task 0 is {tuple(first.shape)} {first.dtype} but of task {i} "
                    f"{tuple(other.shape)} {other.dtype}"
                )
    return None


def unvetted_plugins(learner: MetaLearner) -> list[str]:
    """Plugins that are neither built in nor declare ``vmap_safe = True`` (auto keeps them in the loop)."""
    return [
        name
        for name, plugin in zip(learner.host.names, learner.host.plugins, strict=True)
        if not name.startswith("builtin:") and not getattr(plugin, "vmap_safe", False)
    ]


def choose_engine(learner: MetaLearner, data: list[TaskData]) -> str:
    """``engine="auto"``: vmap for models without convolutions, loop otherwise (see docs/engines.md).

    Measured on CPU (docs/benchmarks/speed.md): vmap is several times faster on the
    overhead-bound sinusoid MLP and slower on conv4 / ResNets, where the per-task loop's
    convolutions are the faster kernels.  Also loop whenever vmap cannot run the batch
    (ragged tasks, a refused plugin or optimizer), and with a third-party plugin that does not
    declare ``vmap_safe = True`` (it may call ``torch.autograd.grad`` or read values).
    """
    return "loop" if ragged(data) is not None else auto_engine(learner)


def auto_engine(learner: MetaLearner) -> str:
    """What ``engine="auto"`` picks for this learner whenever the tasks of a batch stack (the
    trainer's samplers always give such batches)."""
    if learner.vmap_reasons or unvetted_plugins(learner):
        return "loop"
    return "loop" if any(isinstance(m, CONV_MODULES) for m in learner.model.modules()) else "vmap"


class VmapBackend(TorchFuncBackend):
    """``functional_call`` with BatchNorm's ``num_batches_tracked`` counters left out.

    BatchNorm's forward increments that counter in place, which ``torch.func.grad`` refuses;
    metaopt never reads it (running statistics are never written during adaptation).
    """

    name = "vmap"

    def __init__(self, model: nn.Module, bn_policy: str = "transductive") -> None:
        super().__init__(model, bn_policy)
        self._counters = {
            f"{prefix}.num_batches_tracked" if prefix else "num_batches_tracked"
            for prefix, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)
        }

    def prepare(self, training: bool) -> None:
        super().prepare(training)
        self._buffers = {n: (None if n in self._counters else b) for n, b in self._buffers.items()}  # type: ignore[misc]


class VmapEngine:
    """Runs a batch's tasks in chunks of ``learner.task_chunk``, each chunk in one vmap call."""

    def __init__(self, learner: MetaLearner) -> None:
        self.backend = VmapBackend(learner.model, learner.backend.bn_policy)
        #: always on: a model may call F.layer_norm / F.batch_norm itself, with no norm module to find
        self.safe_norms = True

    def run(self, learner: MetaLearner, batch: Batch, stacks: bool = False) -> torch.Tensor:
        """The batch's mean loss; ``stacks``: the caller (``engine="auto"``) already checked the shapes."""
        problem = None if stacks else ragged(batch.data)
        if problem is not None:
            raise DataError(
                f"engine='vmap' stacks the tasks of a meta-batch, but they differ in shape: {problem}. Give every "
                "task the same ways/shots/query (or pad them), or use engine='loop' (engine='auto' falls back to it)."
            )
        device = learner._device()
        stacked = [torch.stack([t[i] for t in batch.data]).to(device, non_blocking=True) for i in range(4)]
        count = len(batch.data)
        chunk = learner.task_chunk or count
        finite = learner.host.finite_check
        saved_backend, learner.backend = learner.backend, self.backend
        self.backend.prepare(batch.training)
        losses, chunks = [], []
        try:
            with torch.enable_grad():
                start = learner.start_params(batch.training, dict(learner.model.named_parameters()))
                for first in range(0, count, chunk):
                    parts = [t[first : first + chunk] for t in stacked]
                    loss, metrics = self._chunk(learner, batch, start, parts, finite)
                    if finite is not None:
                        finite.record_task_losses(list(range(first, first + len(loss))), loss)
                    chunks.append((first, parts, loss.detach(), metrics))
                    if batch.backward_per_task:
                        batch.backward(upcast(loss).sum() / count)
                        loss = loss.detach()
                    losses.append(loss)
        finally:
            self.backend.release()
            learner.backend = saved_backend
        total = torch.cat(losses)
        keys = chunks[0][3].keys()
        batch._tasks = None  # built from the chunks when read
        batch.stacked = (total.detach(), {k: torch.cat([c[3][k] for c in chunks]) for k in keys})
        batch.make_tasks = lambda: [t for c in chunks for t in self._views(learner, batch, *c)]
        return upcast(total).mean()

    def _chunk(
        self, learner: MetaLearner, batch: Batch, start: dict[str, torch.Tensor], parts: list[torch.Tensor], finite: Any
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        def one_task(start: dict[str, torch.Tensor], sx, sy, qx, qy) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            task = Task(
                learner=learner,
                index=None,
                support_x=sx,
                support_y=sy,
                query_x=qx,
                query_y=qy,
                start=start,
                training=batch.training,
                second_order=not learner.first_order,
                vectorised=True,
            )
            with learner._autocast():
                loss = learner.run_task(task)
            return loss, {k: torch.as_tensor(v) for k, v in task.metrics.items()}

        if finite is not None:
            finite.suspended = True
        try:
            with SafeNorms() if self.safe_norms else contextlib.nullcontext():
                return torch.func.vmap(one_task, in_dims=(None, 0, 0, 0, 0), randomness="different")(start, *parts)
        finally:
            if finite is not None:
                finite.suspended = False

    @staticmethod
    def _views(
        learner: MetaLearner,
        batch: Batch,
        first: int,
        parts: list[torch.Tensor],
        loss: torch.Tensor,
        metrics: dict[str, torch.Tensor],
    ) -> list[Task]:
        """Per-task records after the chunk: index, data, loss and metrics (no params, trajectory or stash)."""
        columns = [t.unbind(0) for t in parts]
        values = {k: v.unbind(0) for k, v in metrics.items()}
        return [
            Task(
                learner=learner,
                index=first + j,
                support_x=columns[0][j],
                support_y=columns[1][j],
                query_x=columns[2][j],
                query_y=columns[3][j],
                start={},
                training=batch.training,
                second_order=not learner.first_order,
                loss=task_loss,
                metrics={k: v[j] for k, v in values.items()},
            )
            for j, task_loss in enumerate(loss.unbind(0))
        ]
