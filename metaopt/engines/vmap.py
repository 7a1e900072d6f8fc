"""``engine="vmap"``: every task of a meta-batch at once.

The same hooks run once, inside ``torch.func.vmap`` over the task dimension: a hook sees one
task's tensors (per-task views), inner gradients come from ``torch.func.grad`` (through
``task.grad``), the model runs through ``functional_call`` on this engine's own backend, and
the outer backward is one call per chunk of tasks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from metaopt.backend import TorchFuncBackend
from metaopt.engines.base import EngineContext, make_task, run_task
from metaopt.engines.choose import ragged
from metaopt.errors import DataError
from metaopt.norms import SafeNorms, SafeNormsMode
from metaopt.task import Batch, Task, upcast


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


def stack_tasks(data: list[Any], device: torch.device, checked: bool = False) -> list[torch.Tensor]:
    """The tasks' four fields, each stacked over tasks on ``device``; a :class:`DataError` naming the
    first difference when the tasks differ in shape or dtype (``checked``: the caller has looked)."""
    problem = None
    columns = list(zip(*data))
    if not checked and any(len({t.dtype for t in column}) > 1 for column in columns):
        problem = ragged(data)  # torch.stack would promote the dtypes silently
    if problem is None:
        try:
            stacked = [torch.stack(column) for column in columns]
            return [t if t.device == device else t.to(device, non_blocking=True) for t in stacked]
        except RuntimeError:
            problem = ragged(data)
            if problem is None:
                raise
    raise DataError(
        f"engine='vmap' stacks the tasks of a meta-batch, but they differ in shape: {problem}. Give every "
        "task the same ways/shots/query (or pad them), or use engine='loop' (engine='auto' falls back to it)."
    )


@contextlib.contextmanager
def finite_suspended(finite: Any) -> Iterator[None]:
    """The finite check's per-hook checks off inside a chunk (they read values, which vmap forbids);
    its per-task loss and meta-gradient checks run after the chunk."""
    if finite is not None:
        finite.suspended = True
    try:
        yield
    finally:
        if finite is not None:
            finite.suspended = False


class VmapEngine:
    """Runs a batch's tasks in chunks of ``ctx.task_chunk``, each chunk in one vmap call."""

    name = "vmap"

    def __init__(self, ctx: EngineContext) -> None:
        self.backend = VmapBackend(ctx.model, ctx.backend.bn_policy)
        #: always on: a model may call F.layer_norm / F.batch_norm itself, with no norm module to find
        self.safe_norms = True
        #: per training flag: whether the model calls a torch.* norm function bound before SafeNorms
        #: routed it (then SafeNormsMode stays on); None until the first batch has told
        self.norms_mode: dict[bool, bool | None] = {True: None, False: None}

    def run(self, batch: Batch, ctx: EngineContext, stacks: bool = False) -> torch.Tensor:
        """The batch's mean loss; ``stacks``: the caller (``engine="auto"``) already checked the shapes."""
        self.backend.prepare(batch.training)
        losses, chunks, mean = [], [], None
        try:
            named = self.backend.named_parameters
            stacked = stack_tasks(batch.data, next(iter(named.values())).device if named else ctx.device(), stacks)
            count = len(batch.data)
            chunk = self.chunk_size(ctx, count)
            finite = ctx.finite_check
            with torch.enable_grad():
                start = ctx.start_params(batch.training, named)
                for first in range(0, count, chunk):
                    parts = stacked if chunk >= count else [t[first : first + chunk] for t in stacked]
                    loss, metrics = self._chunk(ctx, batch, start, parts, finite)
                    if finite is not None:
                        finite.record_task_losses(list(range(first, first + loss.shape[0])), loss)
                    chunks.append((first, parts, loss.detach(), metrics))
                    if batch.backward_per_task:
                        mean = self._backward_chunk(batch, loss, count, whole=chunk >= count)
                        loss = loss.detach()
                    losses.append(loss)
        finally:
            self.backend.release()
        total = losses[0] if len(losses) == 1 else torch.cat(losses)
        metrics = chunks[0][3] if len(chunks) == 1 else {k: torch.cat([c[3][k] for c in chunks]) for k in chunks[0][3]}
        batch._tasks = None  # built from the chunks when read
        batch.stacked = (total.detach(), metrics)
        training = batch.training  # not the batch itself: it holds this function (no reference cycle)
        batch.make_tasks = lambda: [t for c in chunks for t in self._views(ctx, training, *c)]
        return upcast(total).mean() if mean is None else mean.detach()

    def chunk_size(self, ctx: EngineContext, count: int) -> int:
        """Tasks per vmap call: ``task_chunk``, else the whole batch."""
        return ctx.task_chunk or count

    def _backward_chunk(self, batch: Batch, loss: torch.Tensor, count: int, whole: bool) -> torch.Tensor | None:
        """The chunk's share of the batch's mean loss, backpropagated (``whole``: the chunk is the batch);
        returns the batch's mean loss when it was the one backpropagated (else None)."""
        wide = upcast(loss)
        if not whole:
            batch.backward(wide.sum() / count)
            return None
        mean = wide.mean()
        batch.backward(mean)
        return mean

    def _chunk(
        self, ctx: EngineContext, batch: Batch, start: dict[str, torch.Tensor], parts: list[torch.Tensor], finite: Any
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with finite_suspended(finite):
            return self._vmapped(ctx, batch, start, parts)

    def _vmapped(
        self, ctx: EngineContext, batch: Batch, start: dict[str, torch.Tensor], parts: list[torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The chunk's per-task losses and metrics: every task's hooks in one vmap call."""

        def one_task(start: dict[str, torch.Tensor], sx, sy, qx, qy) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            task = make_task(ctx, None, (sx, sy, qx, qy), batch.training, start, backend=self.backend, vectorised=True)
            with ctx.autocast():
                loss = run_task(task)
            return loss, {k: torch.as_tensor(v) for k, v in task.metrics.items()}

        with self._norm_routing(batch.training):
            return torch.func.vmap(one_task, in_dims=(None, 0, 0, 0, 0), randomness="different")(start, *parts)

    @contextlib.contextmanager
    def _norm_routing(self, training: bool) -> Iterator[None]:
        """:class:`SafeNorms` (no cost for other torch calls); on the first batch of each kind also
        :class:`SafeNormsMode`, which catches a norm function bound before the routing and, if it
        sees one, stays on for later batches."""
        if not self.safe_norms:
            yield
            return
        known = self.norms_mode[training]
        mode = SafeNormsMode(audit=known is None) if known is not False else None
        with SafeNorms(), mode or contextlib.nullcontext():
            yield
        if mode is not None and known is None:
            self.norms_mode[training] = mode.bound

    @staticmethod
    def _views(
        ctx: EngineContext,
        training: bool,
        first: int,
        parts: list[torch.Tensor],
        loss: torch.Tensor,
        metrics: dict[str, torch.Tensor],
    ) -> list[Task]:
        """Per-task records after the chunk: index, data, loss and metrics (no params, trajectory or stash)."""
        columns = [t.unbind(0) for t in parts]
        values = {k: v.unbind(0) for k, v in metrics.items()}
        records = []
        for j, task_loss in enumerate(loss.unbind(0)):
            data = tuple(column[j] for column in columns)
            task = make_task(ctx, first + j, data, training, {}, backend=None)
            task.loss, task.metrics = task_loss, {k: v[j] for k, v in values.items()}
            records.append(task)
        return records
