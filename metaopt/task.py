"""State objects handed to hooks: a task, an inner trajectory, a meta-batch.

They carry what they need to run pieces of the loop again (the hook relay, the functional
backend, the trajectory factory, the batch's runner) as plain fields set by the engine that
made them; they never call back into the learner.  ``task.learner`` / ``batch.learner`` stay
for plugins that read the learner's settings.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from metaopt.errors import ConfigError
from metaopt.inner_optim import fresh_state
from metaopt.stash import Stash, new_stash

if TYPE_CHECKING:
    from metaopt.inner_optim import InnerOptimizer
    from metaopt.protocols import LearnerView

Params = dict[str, torch.Tensor]


class TaskData(NamedTuple):
    """One task as plain tensors (what samplers yield and users pass in)."""

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor


def grad_dict(loss: torch.Tensor, params: Params, *, create_graph: bool, retain_graph: bool | None = None) -> Params:
    """``autograd.grad`` of ``loss`` w.r.t. every tensor in ``params`` (unused ones get zeros)."""
    tensors = list(params.values())
    grads = torch.autograd.grad(loss, tensors, create_graph=create_graph, retain_graph=retain_graph, allow_unused=True)
    return {name: torch.zeros_like(p) if g is None else g for (name, p), g in zip(params.items(), grads, strict=True)}


#: the float dtypes a loss is averaged and summed in as it is (narrower ones are upcast to float32)
WIDE_FLOATS = (torch.float32, torch.float64)


def upcast(loss: torch.Tensor) -> torch.Tensor:
    """A loss in at least float32 for averaging (bf16/fp16 upcast; float64 stays float64)."""
    if loss.dtype in WIDE_FLOATS:  # what ``.to`` would return, without its dispatch
        return loss
    return loss.to(torch.promote_types(loss.dtype, torch.float32))


def global_norm(tensors: Params | Sequence[torch.Tensor]) -> torch.Tensor:
    """L2 norm over all entries of several tensors."""
    values = tensors.values() if isinstance(tensors, dict) else tensors
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in values]))


@dataclass(eq=False)
class Trajectory:
    """One inner loop: its learning rates, its optimizer and every iterate it visits."""

    steps: int
    lrs: list[float]
    optimizer: InnerOptimizer  # None: plain SGD (see inner_optim.diff_step)
    iterates: list[Params]
    main: bool = True
    k: int = 0

    @property
    def lr(self) -> float:
        return self.lrs[self.k]


class TrajectoryFactory:
    """New inner trajectories: step counts, learning rates and a fresh inner-optimizer state."""

    def __init__(self, inner_steps: int, eval_inner_steps: int, inner_lrs: list[float], template: Any) -> None:
        self.inner_steps, self.eval_inner_steps, self.inner_lrs = inner_steps, eval_inner_steps, inner_lrs
        self.template = template

    def lrs_for(self, steps: int, lr_scale: float = 1.0, lr: float | Sequence[float] | None = None) -> list[float]:
        base = self.inner_lrs if lr is None else ([lr] if isinstance(lr, int | float) else list(lr))
        if 1 < len(base) < steps:
            raise ConfigError(
                f"{steps} inner steps asked for, but inner_lr has only {len(base)} per-step values {base}; "
                f"give at most {len(base)} steps, or build the learner with one rate per step (or a single number)."
            )
        values = base * steps if len(base) == 1 else base[:steps]
        return [float(v) * lr_scale for v in values]

    def new(
        self,
        task: Task,
        steps: int | None,
        lr_scale: float = 1.0,
        *,
        lr: float | Sequence[float] | None = None,
        start: Params | None = None,
        main: bool = True,
    ) -> Trajectory:
        if steps is None:
            steps = self.inner_steps if task.training else self.eval_inner_steps
        start = task.start if start is None else start
        params = [p for group in self.template.param_groups for p in group["params"]]
        return Trajectory(
            steps=steps,
            lrs=self.lrs_for(steps, lr_scale, lr),
            optimizer=fresh_state(self.template, params),
            iterates=[start],
            main=main,
        )


@dataclass(eq=False)
class Task:
    """One task inside a meta-batch.  Hooks read it and put per-task state in ``stash``."""

    learner: LearnerView
    index: int | None  # None inside the vmap engine: one Task object stands for every task of a chunk
    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor
    start: Params
    training: bool
    second_order: bool
    params: Params | None = None
    trajectory: Trajectory | None = None
    query_output: torch.Tensor | None = None
    loss: torch.Tensor | None = None
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    stash: Stash = field(default_factory=new_stash)
    #: True inside the batched-task engine (``engine="vmap"``): tensors are per-task views of
    #: a batch, gradients come from ``torch.func.grad`` (see :meth:`grad`)
    vectorised: bool = False
    #: set by the engine: the hook relay, the functional backend that runs the model, and the
    #: factory of inner trajectories (``adapt`` runs a second one)
    hook: Any = field(default=None, repr=False)
    backend: Any = field(default=None, repr=False)
    trajectories: TrajectoryFactory | None = field(default=None, repr=False)
    #: memory="recompute": inner steps are recomputed in the outer backward (metaopt.recompute);
    #: ``meta_params`` are the meta-parameters a step may use (their gradients flow through it)
    recompute: bool = False
    meta_params: list[torch.Tensor] = field(default_factory=list, repr=False)
    #: True while the outer backward recomputes a step (memory="recompute"): the hooks run a second time
    replaying: bool = False

    @property
    def create_graph(self) -> bool:
        """Whether inner gradients keep their graph (second-order meta-gradient)."""
        return self.training and self.second_order

    def forward(self, x: torch.Tensor, params: Params, **kwargs: Any) -> Any:
        """The model's output on ``x`` with the adapted parameters replaced by ``params``."""
        return self.backend.forward(x, params, **kwargs)

    def support_loss(self, params: Params) -> torch.Tensor:
        """The support loss at ``params`` (through the ``inner_loss`` hook)."""
        return self.hook.inner_loss(task=self, params=params)

    def grad(self, fn: Callable[[Params], torch.Tensor], params: Params, create_graph: bool | None = None) -> Params:
        """The gradient of the scalar ``fn(params)`` w.r.t. ``params``, under either engine.

        Plugins take gradients through this, never with ``torch.autograd.grad`` (which cannot
        run inside ``vmap``): the loop engine uses autograd, the vmap engine ``torch.func.grad``.
        ``create_graph`` (default ``task.create_graph``) keeps the gradient differentiable for
        the meta-gradient; False detaches it (first order).
        """
        graph = self.create_graph if create_graph is None else create_graph
        if not self.vectorised:
            return grad_dict(fn(params), params, create_graph=graph)
        grads = torch.func.grad(fn)(params)
        return grads if graph else {n: g.detach() for n, g in grads.items()}

    def detached(self, params: Params) -> Params:
        """``params`` cut from the meta-graph, ready to adapt from (a fresh start point)."""
        if self.vectorised:
            return {n: p.detach() for n, p in params.items()}
        return {n: p.detach().requires_grad_() for n, p in params.items()}

    def inner_grad_at(self, params: Params, create_graph: bool | None = None) -> Params:
        """The plain support gradient at any point (for perturbations and finite differences)."""
        return self.grad(self.support_loss, params, create_graph)

    def adapt(
        self,
        steps: int | None = None,
        lr_scale: float = 1.0,
        *,
        lr: float | Sequence[float] | None = None,
        start: Params | None = None,
    ) -> tuple[Params, Trajectory]:
        """Run an extra inner trajectory (from ``task.start`` unless given) via the hooks."""
        assert self.trajectories is not None, "a Task is made by an engine (metaopt.engines.make_task)"
        trajectory = self.trajectories.new(self, steps, lr_scale, lr=lr, start=start, main=False)
        params = self.hook.adapt(task=self, trajectory=trajectory)
        return params, trajectory


@dataclass(eq=False)
class Batch:
    """One meta-batch: its tasks, meta-loss and metrics."""

    learner: LearnerView
    data: list[TaskData]
    training: bool
    _tasks: list[Task] | None = field(default=None, repr=False)
    #: the vmap engine's per-task results: losses and metrics stacked over the batch, and how to
    #: build the per-task ``Task`` records from them (only when someone reads ``tasks``)
    stacked: tuple[torch.Tensor, dict[str, torch.Tensor]] | None = field(default=None, repr=False)
    make_tasks: Callable[[], list[Task]] | None = field(default=None, repr=False)
    meta_loss: torch.Tensor | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    stash: Stash = field(default_factory=new_stash)
    reruns: int = 0
    #: the default outer step: each task's loss is backpropagated as soon as it is computed
    #: (one task graph alive at a time; ``meta_loss`` is then detached)
    backward_per_task: bool = False
    #: set by the learner: how to run the batch's tasks again, and how to backpropagate a loss
    runner: Callable[[Batch], torch.Tensor] | None = field(default=None, repr=False)
    backward_fn: Callable[[torch.Tensor], None] | None = field(default=None, repr=False)
    #: set by ``learner.backward``: the meta-parameters whose ``.grad`` the outer step fills
    meta_params: list[torch.Tensor] = field(default_factory=list, repr=False)

    @property
    def tasks(self) -> list[Task]:
        """The batch's tasks (after the vmap engine: per-task records, built when first read)."""
        if self._tasks is None:
            self._tasks = self.make_tasks() if self.make_tasks is not None else []
        return self._tasks

    @tasks.setter
    def tasks(self, tasks: list[Task]) -> None:
        self._tasks = tasks

    def rerun(self) -> torch.Tensor:
        """Recompute the whole meta-loss (every inner loop) from the current meta-parameters."""
        assert self.runner is not None
        self.reruns += 1
        return self.runner(self)

    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate ``loss`` into ``.grad`` (through the accelerator when there is one)."""
        assert self.backward_fn is not None
        self.backward_fn(loss)
