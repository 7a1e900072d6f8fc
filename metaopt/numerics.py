"""Built-in NaN/inf detection: a plugin that checks losses and gradients where they appear.

It wraps (outermost, ``tryfirst``) the hooks that produce numbers: ``inner_loss``,
``inner_grad``, ``outer_loss``, ``loss_modification`` and ``outer_step`` (the meta-gradient
left in ``.grad``).  The first non-finite value raises :class:`~metaopt.errors.NumericalError`
naming the iteration, the task and the hook with the plugins that implement it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from metaopt.builtin import BUILTIN_PREFIX
from metaopt.errors import NumericalError
from metaopt.hookspecs import hookimpl
from metaopt.task import Batch, Params, Task


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """True when every entry of every tensor is finite (one device sync)."""
    flags = [torch.isfinite(t).all() for t in tensors]
    return bool(torch.stack(flags).all()) if flags else True


def nonfinite_names(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the tensors holding a NaN/inf (empty when all are finite; one device sync)."""
    if all_finite(tensors.values()):
        return []
    return [n for n, t in tensors.items() if not all_finite([t])]


def _value(t: torch.Tensor) -> str:
    return f" = {float(t.detach())}" if t.numel() == 1 else ""


class FiniteCheck:
    """Raise at the first NaN/inf loss or gradient, with where it happened."""

    name = BUILTIN_PREFIX + "finite_check"

    def _fail(self, learner: Any, hook: str, what: str, task: Task | None) -> None:
        impls = getattr(learner.hook, hook).get_hookimpls()
        owners = ", ".join(i.plugin_name for i in reversed(impls) if i.plugin_name != self.name)
        iteration = learner.iteration + 1
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

    @hookimpl(wrapper=True, tryfirst=True)
    def inner_loss(self, task: Task, params: Params):
        loss = yield
        if not all_finite([loss]):
            self._fail(task.learner, "inner_loss", f"support loss{_value(loss)}", task)
        return loss

    @hookimpl(wrapper=True, tryfirst=True)
    def inner_grad(self, task: Task, params: Params, loss: torch.Tensor):
        grads = yield
        bad = nonfinite_names(grads) if grads is not None else []
        if bad:
            self._fail(task.learner, "inner_grad", f"inner gradient (in {bad[:3]})", task)
        return grads

    @hookimpl(wrapper=True, tryfirst=True)
    def outer_loss(self, task: Task, params: Params):
        loss = yield
        if not all_finite([loss]):
            self._fail(task.learner, "outer_loss", f"query loss{_value(loss)}", task)
        return loss

    @hookimpl(wrapper=True, tryfirst=True)
    def loss_modification(self, task: Task, params: Params, loss: torch.Tensor):
        results = yield
        for terms in results:
            for name, term in (terms or {}).items():
                if not all_finite([term]):
                    self._fail(task.learner, "loss_modification", f"loss term {name!r}{_value(term)}", task)
        return results

    @hookimpl(wrapper=True, tryfirst=True)
    def outer_step(self, batch: Batch):
        done = yield
        grads = {n: p.grad for n, p in batch.learner.named_parameters() if p.grad is not None}
        bad = nonfinite_names(grads)
        if bad:
            self._fail(batch.learner, "outer_step", f"meta-gradient (in {bad[:3]})", None)
        return done
