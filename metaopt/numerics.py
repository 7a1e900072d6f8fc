"""Built-in NaN/inf detection: a plugin that checks losses and gradients where they appear.

It wraps (outermost, ``tryfirst``) the hooks that produce numbers: ``inner_loss``,
``inner_grad``, ``outer_loss``, ``loss_modification`` and ``outer_step`` (the meta-gradient
left in ``.grad``).  The first non-finite value raises :class:`~metaopt.errors.NumericalError`
naming the iteration, the task and the hook with the plugins that implement it.

The check never waits for the device inside a task: each hook records a detached flag tensor
(no host sync), and all flags of a batch are read at once when the batch ends: after the
meta-gradient in ``outer_step`` (training, before the optimizer can step) or in ``batch_end``
(evaluation).  One host-device sync per batch instead of one per task and step.  Under the vmap
engine the per-hook records are skipped (the engines call hooks through a relay without them) and
each task's final loss is recorded instead; the pending values are read with torch's fused
non-finite check (:func:`_all_finite_at_once`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from metaopt.builtin import BUILTIN_PREFIX
from metaopt.errors import NumericalError
from metaopt.hookspecs import hookimpl
from metaopt.task import WIDE_FLOATS, Batch, Params, Task


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """True when every entry of every tensor is finite (one device sync)."""
    flags = [torch.isfinite(t).all() for t in tensors]
    return bool(torch.stack(flags).all()) if flags else True


def nonfinite_names(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the tensors holding a NaN/inf (empty when all are finite; one device sync)."""
    if all_finite(tensors.values()):
        return []
    return [n for n, t in tensors.items() if not all_finite([t])]


def max_abs(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per-tensor max |x| as 0-dim tensors, finite exactly where the tensor is (no sync).

    On CUDA, two ``_foreach`` calls for the whole list (``abs`` then ``max``: few kernel
    launches); elsewhere one ``_foreach_norm`` with ``ord=inf`` (one call for the list, each
    tensor read once, no ``abs`` copy).  Exact: an L2 norm could overflow.  Empty tensors count
    as 0.
    """
    full = [t for t in tensors if t.numel()]
    with torch.no_grad():
        if full and full[0].is_cuda:
            norms = iter(torch._foreach_max(torch._foreach_abs(full)))
        else:
            norms = iter(torch._foreach_norm(full, math.inf) if full else ())
        if len(full) == len(tensors):
            return list(norms)
        return [next(norms) if t.numel() else t.new_zeros(()) for t in tensors]


@dataclass
class _Record:
    """Checked values (tensors: losses, gradients, or 0-dim summaries finite iff their source was)
    and how to describe a failure."""

    values: list[torch.Tensor]
    hook: str
    describe: Callable[[list[bool], list[torch.Tensor]], str]  # (finite flags, values) -> what failed
    task: Task | None

    def finite(self) -> list[bool]:
        """Per value: whether every entry is finite (a device sync)."""
        return [bool(torch.isfinite(v).all()) for v in self.values]


def _grads_record(
    grads: list[torch.Tensor], names: Callable[[], list[str]], hook: str, what: str, task: Task | None
) -> _Record:
    """A record of gradients; a failure names (up to three of) the non-finite ones (``names()``, the
    gradients' names in order, is called only then)."""
    return _Record(max_abs(grads), hook, _naming(names, what), task)


def _naming(names: Callable[[], list[str]], what: str) -> Callable[[list[bool], list[torch.Tensor]], str]:
    """A record's ``describe`` for gradients: ``what`` and the names of (up to three) non-finite ones."""

    def describe(finite: list[bool], _: list[torch.Tensor]) -> str:
        return f"{what} (in {[n for n, ok in zip(names(), finite, strict=True) if not ok][:3]})"

    return describe


def _live_grads_record(grads: list[torch.Tensor], names: Callable[[], list[str]], what: str) -> _Record:
    """:func:`_grads_record` for gradients that stay alive until the check (the meta-gradient in
    ``.grad``): the gradients themselves, read by :meth:`FiniteCheck.flush` with everything else."""
    return _Record(list(grads), "outer_step", _naming(names, what), None)


#: torch's fused non-finite check (GradScaler.unscale_'s): one call for a list of tensors of any float dtypes
_FUSED_CHECK = getattr(torch, "_amp_foreach_non_finite_check_and_unscale_", None)

#: per device, the fused check's flag (kept at 0 between checks) and its scale of exactly 1
Scratch = dict[torch.device, tuple[torch.Tensor, torch.Tensor]]


def _all_finite_at_once(values: list[torch.Tensor], scratch: Scratch | None = None) -> bool:
    """Whether every entry of every value is finite, in one host read; False may also mean that a sum
    overflowed (then the caller reads each value on its own, and only that read decides).

    First torch's fused check, which GradScaler runs on every mixed-precision step: it flags any NaN/inf
    entry of a list of strided float tensors on one device, and with a scale of exactly 1 leaves them as
    they are.  It refuses anything else (an integer or sparse value, a second device), and then the sum
    of the values' sums (:func:`_finite_witness`) decides.  ``scratch`` keeps the flag between calls.
    """
    if _FUSED_CHECK is not None:
        device = values[0].device
        pair = None if scratch is None else scratch.get(device)
        if pair is None:
            pair = (torch.zeros(1, device=device), torch.ones(1, device=device))
            if scratch is not None:
                scratch[device] = pair
        found, unit = pair
        try:
            _FUSED_CHECK(values, found, unit)  # no autograd record: it has no derivative and writes no value
        except (RuntimeError, NotImplementedError):
            found.zero_()  # it may have flagged a value before it stopped at one it does not take
        else:
            if not found.item():
                return True
            found.zero_()  # back to 0 for the next check
            return False
    # a sum is finite only when every term is (a NaN or inf anywhere makes it NaN or inf)
    with torch.no_grad() if any(v.requires_grad for v in values) else contextlib.nullcontext():
        return math.isfinite(float(_finite_witness(values)))


def _finite_witness(values: list[torch.Tensor]) -> torch.Tensor:
    """A 0-dim tensor that is finite when every entry of every value is: the sum of their sums (a NaN,
    or infinities of either sign, make a sum non-finite).  A sum of finite entries may still overflow;
    :meth:`FiniteCheck.flush` then reads every value on its own."""
    sums = [_wide_sum(v) for v in values]
    return torch.stack(sums).sum() if len(sums) > 1 else sums[0]


def _wide_sum(v: torch.Tensor) -> torch.Tensor:
    """``v``'s sum in at least float32 (a 0-dim value of a wide dtype is its own sum)."""
    if v.dtype not in WIDE_FLOATS:  # narrower floats summed in float32: no float16 overflow
        return v.sum(dtype=torch.float32)
    return v if v.dim() == 0 else v.sum()


def _value(t: torch.Tensor) -> str:
    return f" = {float(t.detach())}" if t.numel() == 1 else ""


class FiniteCheck:
    """Raise at the first NaN/inf loss or gradient, with where it happened."""

    name = BUILTIN_PREFIX + "finite_check"

    def __init__(self) -> None:
        self._records: list[_Record] = []
        self._iteration = 0
        #: set by the vmap engine while it runs: per-hook values are per-task views that cannot
        #: leave vmap; the engine records each task's loss afterwards (:meth:`record_task_losses`)
        self.suspended = False
        self._scratch: Scratch = {}

    def _record(self, values: list[torch.Tensor], hook: str, describe: Callable[..., str], task: Task) -> None:
        if self.suspended or task.replaying:  # a replayed step was checked when it first ran
            return
        # detached: a record must not keep a task's graph alive until the batch ends
        self._records.append(_Record([v.detach() for v in values], hook, describe, task))

    def record_task_losses(self, index: list[int], losses: torch.Tensor) -> None:
        """The vmap engine's check: the final loss of the tasks ``index``, one record per chunk (a
        NaN/inf anywhere in a task's inner loop reaches its loss)."""

        def describe(_: list[bool], values: list[torch.Tensor]) -> str:
            bad = [i for i, ok in zip(index, torch.isfinite(values[0]).tolist(), strict=True) if not ok]
            return f"task loss (engine='vmap', tasks {bad[:5]})"

        if not self.suspended:
            self._records.append(_Record([losses.detach()], "outer_loss", describe, None))

    def reset(self, iteration: int) -> None:
        """Drop pending flags (a new batch, or a new ``learner.adapt`` call, begins)."""
        self._records = []
        self._iteration = iteration

    def flush(self, learner: Any, extra: _Record | None = None) -> None:
        """Read every pending flag (one sync) and raise for the first non-finite one."""
        records = self._records + ([extra] if extra is not None else [])
        self._records = []
        values = [v for r in records for v in r.values]
        if not values:
            return
        if _all_finite_at_once(values, self._scratch):
            return
        for record in records:  # something is non-finite (or a sum overflowed): each record read on its own
            finite = record.finite()
            if not all(finite):
                self._fail(learner, record.hook, record.describe(finite, record.values), record.task)

    def _fail(self, learner: Any, hook: str, what: str, task: Task | None) -> None:
        impls = getattr(learner.hook, hook).get_hookimpls()
        owners = ", ".join(i.plugin_name for i in reversed(impls) if i.plugin_name != self.name)
        iteration = self._iteration or learner.iteration + 1
        where = f", task {task.index}" if task is not None else ""
        phase = "" if task is None else (" (training)" if task.training else " (evaluation)")
        raise NumericalError(
            f"non-finite {what} at iteration {iteration}{where}{phase}, in hook {hook!r} "
            f"(implemented by: {owners}). Lower the learning rates, clip the outer gradient "
            "(clip_grad_norm), check the data for NaN/inf, or skip such batches (on_nonfinite='skip').",
            iteration=iteration,
            hook=hook,
            task=None if task is None else task.index,
        )

    @hookimpl(tryfirst=True)
    def batch_start(self, batch: Batch) -> None:
        self.reset(batch.learner.iteration + 1)

    @hookimpl(wrapper=True, tryfirst=True)
    def inner_loss(self, task: Task, params: Params):
        loss = yield
        self._record([loss], "inner_loss", lambda _, v: f"support loss{_value(v[0])}", task)
        return loss

    @hookimpl(wrapper=True, tryfirst=True)
    def inner_grad(self, task: Task, params: Params):
        grads = yield
        if grads and not self.suspended and not task.replaying:
            self._records.append(
                _grads_record(list(grads.values()), lambda: list(grads), "inner_grad", "inner gradient", task)
            )
        return grads

    @hookimpl(wrapper=True, tryfirst=True)
    def outer_loss(self, task: Task, params: Params):
        loss = yield
        self._record([loss], "outer_loss", lambda _, v: f"query loss{_value(v[0])}", task)
        return loss

    @hookimpl(wrapper=True, tryfirst=True)
    def loss_modification(self, task: Task, params: Params, loss: torch.Tensor):
        results = yield
        for terms in results:
            for name, term in (terms or {}).items():
                self._record([term], "loss_modification", lambda _, v, n=name: f"loss term {n!r}{_value(v[0])}", task)
        return results

    @hookimpl(wrapper=True, tryfirst=True)
    def outer_step(self, batch: Batch):
        done = yield
        learner = batch.learner
        params = [p for p in batch.meta_params or learner.parameters() if p.grad is not None]

        def names() -> list[str]:
            by_id = {id(p): n for n, p in learner.named_parameters()}
            return [by_id.get(id(p), "?") for p in params]

        extra = _live_grads_record([p.grad for p in params], names, "meta-gradient") if params else None
        self.flush(learner, extra)
        return done

    @hookimpl(tryfirst=True)
    def batch_end(self, batch: Batch) -> None:
        self.flush(batch.learner)  # evaluation batches (training ones were read in outer_step)
