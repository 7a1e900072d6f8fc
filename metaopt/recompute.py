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

Under ``engine="vmap"`` a step runs inside ``torch.func.vmap``, where an autograd node cannot be
made per task; :class:`VmapStep` gives the step a vmap rule instead, which makes one
:class:`ReplayedStep` node for the whole chunk of tasks (its step is the vmapped per-task step),
outside the transform, so the outer backward recomputes one step of every task of the chunk at a
time.  The replay restores what the forward ran under: the random state, autocast and
:class:`~metaopt.norms.SafeNorms` (or :class:`~metaopt.norms.SafeNormsMode`).

The hooks of a step (``inner_grad``, ``inner_step`` and the ``inner_loss`` they call) therefore run
twice; plugins declare that this is safe through the ``replay_safe`` hook (docs/writing-plugins.md).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch

from metaopt.inner_optim import ExactAdam
from metaopt.norms import active_norm_kinds

if TYPE_CHECKING:
    from metaopt.task import Params, Task, Trajectory

MEMORY_MODES = ("keep", "recompute")
#: hooks that run inside a recomputed step
REPLAYED_HOOKS = ("inner_loss", "inner_grad", "inner_step")
_STATE = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def random_state() -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    """torch's CPU generator state and, once CUDA is in use, every device's (to replay a forward)."""
    return torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None


@contextlib.contextmanager
def replaying_random(state: tuple[torch.Tensor, list[torch.Tensor] | None]) -> Iterator[None]:
    """A block that draws from the generators as they were at :func:`random_state` and leaves them as
    it found them."""
    cpu, cuda = state
    with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if cuda is not None else []):
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        yield


class ReplayedStep(torch.autograd.Function):
    """``outputs = run(inputs)``, keeping only ``inputs``; the backward recomputes ``run``'s graph."""

    @staticmethod
    def forward(ctx: Any, run: Callable[..., tuple[torch.Tensor, ...]], count: int, *tensors: torch.Tensor) -> Any:
        # tensors = the step's own inputs (count of them), then every meta-parameter it may use
        ctx.run, ctx.count = run, count
        ctx.rng = random_state()
        ctx.surroundings = _surroundings()
        ctx.save_for_backward(*tensors[:count])
        ctx.meta = tensors[count:]
        with torch.enable_grad():
            inputs = [t.detach().requires_grad_(t.requires_grad) for t in tensors[:count]]
            outputs = run(*inputs, create_graph=False)
        return tuple(o.detach() for o in outputs)

    @staticmethod
    def backward(ctx: Any, *grad_outputs: torch.Tensor) -> Any:
        saved = ctx.saved_tensors
        with contextlib.ExitStack() as stack:
            stack.enter_context(replaying_random(ctx.rng))
            with torch.enable_grad():
                inputs = [t.detach().requires_grad_() for t in saved]
                with contextlib.ExitStack() as surroundings:  # the step's forward as it ran; its VJP as the caller's
                    for surrounding in ctx.surroundings:
                        surroundings.enter_context(surrounding)
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


def _surroundings() -> list[contextlib.AbstractContextManager[Any]]:
    """What a step ran under that the outer backward must enter again: autocast, the norm routing."""
    entered: list[contextlib.AbstractContextManager[Any]] = []
    for device in ("cpu", "cuda"):
        if torch.is_autocast_enabled(device):
            entered.append(torch.autocast(device, dtype=torch.get_autocast_dtype(device)))
    return entered + [kind() for kind in active_norm_kinds()]


class VmapStep(torch.autograd.Function):
    """A replayed step called inside ``torch.func.vmap``: its vmap rule makes one :class:`ReplayedStep`
    node over the whole chunk (``run`` vmapped over the tasks), outside the transform."""

    @staticmethod
    def forward(step: Callable[..., Any], count: int, *tensors: torch.Tensor) -> Any:
        raise RuntimeError("VmapStep runs only inside torch.func.vmap (the vmap engine)")

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        pass

    @staticmethod
    def vmap(info: Any, in_dims: tuple[int | None, ...], step: Callable[..., Any], count: int, *tensors: Any) -> Any:
        # tensors: the step's own inputs (count), the task's data (4), then the meta-parameters (unbatched)
        dims = in_dims[2:]
        batched = [
            t.expand(info.batch_size, *t.shape) if d is None else t.movedim(d, 0)
            for t, d in zip(tensors[: count + 4], dims, strict=False)
        ]
        own, data, meta = batched[:count], batched[count:], tensors[count + 4 :]

        def run(*inputs: torch.Tensor, create_graph: bool) -> tuple[torch.Tensor, ...]:
            per_task = torch.func.vmap(lambda *args: step(*args, create_graph=create_graph), randomness=info.randomness)
            return tuple(per_task(*inputs, *data))

        outputs = ReplayedStep.apply(run, count, *own, *meta)
        return tuple(outputs), tuple(0 for _ in outputs)


def replayed_step(task: Task, trajectory: Trajectory, params: Params) -> Params:
    """Inner step ``trajectory.k`` from ``params`` as one :class:`ReplayedStep` node (per chunk under vmap)."""
    hook, k, opt = task.hook, trajectory.k, trajectory.optimizer
    names = list(params)
    adam = isinstance(opt, ExactAdam)
    state: list[Any] = [list(getattr(opt, field)) for field in _STATE] if adam else []
    counters = list(opt.steps) if adam else []
    slots = [(f, i) for f, values in enumerate(state) for i, v in enumerate(values) if v is not None]

    def run(*inputs: torch.Tensor, create_graph: bool, on: Task = task) -> tuple[torch.Tensor, ...]:
        trajectory.k = k  # the outer backward replays this step later, when k has moved on
        second_order, on.second_order = on.second_order, create_graph  # the forward needs no graph
        on.replaying = create_graph  # the outer backward's replay: hooks' checks already ran in the forward
        try:
            return _step(on, inputs)
        finally:
            on.second_order, on.replaying = second_order, False

    def _step(on: Task, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        current = dict(zip(names, inputs[: len(names)], strict=True))
        if adam:  # the optimizer state as it was before this step
            restored = [list(values) for values in state]
            for (f, i), tensor in zip(slots, inputs[len(names) :], strict=True):
                restored[f][i] = tensor
            for field, values in zip(_STATE, restored, strict=True):
                setattr(opt, field, values)
            opt.steps = list(counters)
        grads = hook.inner_grad(task=on, params=current)
        new = hook.inner_step(task=on, trajectory=trajectory, params=current, grads=grads)
        outputs = tuple(new[n] for n in names)
        if adam:
            outputs += tuple(t for field in _STATE for t in getattr(opt, field) if t is not None)
        return outputs

    own = [params[n] for n in names] + [state[f][i] for f, i in slots]
    if task.vectorised:
        # a torch function mode is off while it handles a call (VmapStep.apply): enter the norm routing again inside
        norms = active_norm_kinds()

        def one_task(*args: torch.Tensor, create_graph: bool) -> tuple[torch.Tensor, ...]:
            # one task of the chunk: a view of the task record holding that task's own data
            view = copy.copy(task)
            view.support_x, view.support_y, view.query_x, view.query_y = args[len(own) :]
            with contextlib.ExitStack() as stack:
                for kind in norms:
                    stack.enter_context(kind())
                return run(*args[: len(own)], create_graph=create_graph, on=view)

        data = (task.support_x, task.support_y, task.query_x, task.query_y)
        outputs = VmapStep.apply(one_task, len(own), *own, *data, *task.meta_params)
    else:
        outputs = ReplayedStep.apply(run, len(own), *own, *task.meta_params)
    new_params = dict(zip(names, outputs[: len(names)], strict=True))
    if adam:  # the state after the step: the node's outputs, which carry the graph
        rest = iter(outputs[len(names) :])
        for field in _STATE:
            setattr(opt, field, [None if v is None else next(rest) for v in getattr(opt, field)])
    return new_params
