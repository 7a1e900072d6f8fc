"""``memory="recompute"``: exact second-order meta-gradients holding one inner step's graph at a time.

Second-order MAML keeps every inner step's graph until the outer backward, so memory grows with
the number of inner steps K.  Here each step is one :class:`ReplayedStep` autograd node: its
forward computes the step from detached inputs (the parameters before it, and the inner
optimizer's state) and keeps only those inputs and the random state; when the outer backward
reaches it, the step is computed again from them with its second-order graph, the
vector-Jacobian product is taken, and that graph is freed.  Gradients reach every meta-parameter
the step uses (learned inner rates, parameters that are not adapted) because they are inputs of
the node.  The meta-gradient equals the default's (float64 tests to 1e-10 and against central
differences: tests/test_recompute.py), for one extra forward and backward of each step.

The hooks of a step (``inner_grad``, ``inner_step`` and the ``inner_loss`` they call) therefore run
twice; plugins declare that this is safe through the ``replay_safe`` hook (docs/writing-plugins.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from metaopt.inner_optim import ExactAdam

if TYPE_CHECKING:
    from metaopt.task import Params, Task, Trajectory

MEMORY_MODES = ("keep", "recompute")
#: hooks that run inside a recomputed step
REPLAYED_HOOKS = ("inner_loss", "inner_grad", "inner_step")
_STATE = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


class ReplayedStep(torch.autograd.Function):
    """``outputs = run(inputs)``, keeping only ``inputs``; the backward recomputes ``run``'s graph."""

    @staticmethod
    def forward(ctx: Any, run: Callable[..., tuple[torch.Tensor, ...]], count: int, *tensors: torch.Tensor) -> Any:
        # tensors = the step's own inputs (count of them), then every meta-parameter it may use
        ctx.run, ctx.count = run, count
        ctx.rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        ctx.save_for_backward(*tensors[:count])
        ctx.meta = tensors[count:]
        with torch.enable_grad():
            inputs = [t.detach().requires_grad_(t.requires_grad) for t in tensors[:count]]
            outputs = run(*inputs, create_graph=False)
        return tuple(o.detach() for o in outputs)

    @staticmethod
    def backward(ctx: Any, *grad_outputs: torch.Tensor) -> Any:
        saved = ctx.saved_tensors
        with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if ctx.cuda_rng is not None else []):
            torch.set_rng_state(ctx.rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state_all(ctx.cuda_rng)
            with torch.enable_grad():
                inputs = [t.detach().requires_grad_() for t in saved]
                outputs = ctx.run(*inputs, create_graph=True)
                wrt = inputs + [m for m in ctx.meta if m.requires_grad]
                pairs = [
                    (o, g) for o, g in zip(outputs, grad_outputs, strict=True) if g is not None and o.requires_grad
                ]
                grads = (
                    torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True)
                    if pairs
                    else [None] * len(wrt)
                )
        # the node's closure reaches the trajectory, whose iterates reach this node: break that cycle now,
        # or every step's saved inputs wait for the cyclic garbage collector (memory grew per iteration)
        ctx.run = None
        grads = list(grads)
        input_grads = grads[: len(inputs)]
        meta_iter = iter(grads[len(inputs) :])
        meta_grads = [next(meta_iter) if m.requires_grad else None for m in ctx.meta]
        ctx.meta = ()
        return (None, None, *input_grads, *meta_grads)


def replayed_step(task: Task, trajectory: Trajectory, params: Params) -> Params:
    """Inner step ``trajectory.k`` from ``params`` as one :class:`ReplayedStep` node."""
    hook, k, opt = task.hook, trajectory.k, trajectory.optimizer
    names = list(params)
    adam = isinstance(opt, ExactAdam)
    state: list[Any] = [list(getattr(opt, field)) for field in _STATE] if adam else []
    counters = list(opt.steps) if adam else []
    slots = [(f, i) for f, values in enumerate(state) for i, v in enumerate(values) if v is not None]

    def run(*inputs: torch.Tensor, create_graph: bool) -> tuple[torch.Tensor, ...]:
        trajectory.k = k  # the outer backward replays this step later, when k has moved on
        second_order, task.second_order = task.second_order, create_graph  # the forward needs no graph
        try:
            return _step(inputs)
        finally:
            task.second_order = second_order

    def _step(inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        current = dict(zip(names, inputs[: len(names)], strict=True))
        if adam:  # the optimizer state as it was before this step
            restored = [list(values) for values in state]
            for (f, i), tensor in zip(slots, inputs[len(names) :], strict=True):
                restored[f][i] = tensor
            for field, values in zip(_STATE, restored, strict=True):
                setattr(opt, field, values)
            opt.steps = list(counters)
        grads = hook.inner_grad(task=task, params=current)
        new = hook.inner_step(task=task, trajectory=trajectory, params=current, grads=grads)
        outputs = tuple(new[n] for n in names)
        if adam:
            outputs += tuple(t for field in _STATE for t in getattr(opt, field) if t is not None)
        return outputs

    own = [params[n] for n in names] + [state[f][i] for f, i in slots]
    outputs = ReplayedStep.apply(run, len(own), *own, *task.meta_params)
    new_params = dict(zip(names, outputs[: len(names)], strict=True))
    if adam:  # the state after the step: the node's outputs, which carry the graph
        rest = iter(outputs[len(names) :])
        for field in _STATE:
            setattr(opt, field, [None if v is None else next(rest) for v in getattr(opt, field)])
    return new_params
