"""Every hook of the metaopt loop, grouped by phase, in firing order.

Call modes (see ``docs/writing-plugins.md``):

* **replace** (``firstresult``): the first non-``None`` result wins.  Built-in behaviour is
  registered ``trylast``, so any plugin that returns a value replaces it.  At most one
  non-built-in plugin may implement a replace hook; a second one is a
  :class:`~metaopt.errors.PluginConflictError` when the learner is built.
* **wrap**: any hook may be wrapped with ``@hookimpl(wrapper=True)``; wrappers nest in the
  order the user listed the plugins (first listed is outermost).
* **add**: every plugin's result is collected (``loss_modification`` terms are summed).
* **notify**: every plugin is called, results are ignored.

``Params`` below is ``dict[str, torch.Tensor]``: the adapted parameters by name, in the order
of ``model.named_parameters()``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import torch

    from metaopt.protocols import LearnerView as MetaLearner
    from metaopt.task import Batch, Params, Task, Trajectory

hookspec = pluggy.HookspecMarker("metaopt")
hookimpl = pluggy.HookimplMarker("metaopt")

# ---------------------------------------------------------------------------------------
# Setup phase: fires once, when the learner is built.
# ---------------------------------------------------------------------------------------


@hookspec
def configure(learner: MetaLearner) -> None:
    """Validate settings against the learner and the other plugins.   (notify)

    Fires once while ``MetaLearner`` is built, after all plugins are registered and before
    ``adapted_params``.  Raise :class:`~metaopt.errors.ConfigError` for anything that cannot
    work; this is the place to fail at step 0 instead of step 500.
    """


@hookspec(firstresult=True)
def adapted_params(learner: MetaLearner, candidates: list[str]) -> list[str] | None:
    """Choose which parameters are adapted per task.   (replace)

    ``candidates`` are the names of all trainable (``requires_grad``) model parameters.
    Return the subset to adapt, in the given order.  Default: all of them.
    """


@hookspec
def plugin_modules(learner: MetaLearner) -> dict[str, torch.nn.Module] | None:
    """Declare modules a plugin owns (e.g. a hypernetwork).   (add)

    Their parameters are meta-parameters: they are part of ``learner.parameters()``,
    ``learner.state_dict()``, the outer gradient and checkpoints.  Names must be unique.
    """


@hookspec
def replay_safe(learner: MetaLearner) -> bool | str | None:
    """Whether this plugin's inner-loop hooks may run a second time.   (add; asked per plugin)

    Asked when the learner is built with ``memory="recompute"``: the outer backward then
    recomputes each inner step (``inner_loss``, ``inner_grad``, ``inner_step``) from the saved
    parameters, so those hooks run again, in the same order, with the same arguments and the same
    random state.  Return True when a second run computes the same values and changes nothing
    else (no counters, no stash writes, no host reads that differ); a string (the reason) or False
    to refuse the combination.  A plugin that implements one of those hooks, or replaces
    ``adapt``, and does not answer True is refused when the learner is built.
    """


# ---------------------------------------------------------------------------------------
# Batch phase: once per meta-batch.
# ---------------------------------------------------------------------------------------


@hookspec
def batch_start(batch: Batch) -> None:
    """A meta-batch begins (training and evaluation; see ``batch.training``).   (notify)"""


# ---------------------------------------------------------------------------------------
# Task phase: once per task, in order.
# ---------------------------------------------------------------------------------------


@hookspec
def task_start(task: Task) -> None:
    """A task begins: ``task.start`` holds the meta-parameters it adapts from.   (notify)

    Plugins may set ``task.second_order`` (e.g. first-order algorithms set it False) and
    put per-task state in ``task.stash``.
    """


@hookspec(firstresult=True)
def adapt(task: Task, trajectory: Trajectory) -> Params | None:
    """Run a whole inner loop and return the adapted parameters.   (replace)

    Default: ``trajectory.steps`` gradient steps, each firing ``inner_loss``,
    ``inner_grad``, ``inner_step`` and ``after_inner_step``.  A plugin that generates the
    update directly (HyperMAML) replaces it.  Fires for the main trajectory and for every
    extra trajectory a plugin asks for with ``task.adapt(...)``.
    """


@hookspec(firstresult=True)
def inner_loss(task: Task, params: Params) -> torch.Tensor | None:
    """Support loss at ``params``.   (replace)

    Default: ``learner.loss_fn(model(support_x; params), support_y)``.
    """


@hookspec(firstresult=True)
def inner_grad(task: Task, params: Params) -> Params | None:
    """Gradient used for the inner step at ``params``.   (replace)

    Default: ``task.inner_grad_at(params)``, the support gradient (through ``inner_loss``),
    differentiable when ``task.create_graph``.  Sharp-MAML returns the gradient at a perturbed
    point.  Take every gradient with ``task.grad(fn, params)`` or ``task.inner_grad_at(p)``,
    never ``torch.autograd.grad``: under ``engine="vmap"`` they use ``torch.func.grad``.
    """


@hookspec(firstresult=True)
def inner_step(task: Task, trajectory: Trajectory, params: Params, grads: Params) -> Params | None:
    """Take one inner step (index ``trajectory.k``) and return the new parameters.   (replace)

    Default: ``p - lr * g`` for plain SGD, else the trajectory's differentiable ``higher`` optimizer
    with learning rate ``trajectory.lrs[trajectory.k]``.
    """


@hookspec
def after_inner_step(task: Task, trajectory: Trajectory, params: Params) -> None:
    """The inner step ``trajectory.k`` produced ``params``.   (notify)"""


@hookspec(firstresult=True)
def outer_loss(task: Task, params: Params) -> torch.Tensor | None:
    """The task's contribution to the meta-loss, from adapted ``params``.   (replace)

    Default: ``loss_fn(model(query_x; params), query_y)``; it also sets
    ``task.query_output`` and ``task.metrics``.  First-order estimators replace it with a
    surrogate whose gradient is their estimate and whose value is the query loss.
    """


@hookspec
def loss_modification(task: Task, params: Params, loss: torch.Tensor) -> dict[str, torch.Tensor] | None:
    """Extra named loss terms for this task (regularisers).   (add)

    Every plugin's terms are summed onto the outer loss; order is irrelevant.  Term names
    are reported in ``task.metrics``.  Not fired during evaluation.
    """


@hookspec
def task_end(task: Task) -> None:
    """The task's outer loss ``task.loss`` is final.   (notify)"""


# ---------------------------------------------------------------------------------------
# Outer phase: once per meta-batch, training only.
# ---------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def outer_step(batch: Batch) -> bool | None:
    """Accumulate the meta-gradient into ``.grad`` of every meta-parameter.   (replace)

    Default: ``batch.backward(batch.meta_loss)``; when no plugin implements this hook (and
    ``per_task_backward`` is on, the default), each task's loss was already backpropagated
    when the task ended (same gradient, one task's graph in memory at a time).  An
    implementation gets ``batch.meta_loss`` with the graph of the whole batch; a plugin that
    replaces this hook only under some options hides it otherwise (``self.outer_step = None``
    in ``__init__``, as ``sharp_maml`` does with ``rho_outer=0``).  ``batch.rerun()``
    recomputes the whole meta-loss (all inner loops included) from the current
    meta-parameters.  Return True.
    The user's optimizer steps afterwards; this hook never changes parameter values for
    good.
    """


@hookspec
def batch_end(batch: Batch) -> None:
    """The meta-batch is done; ``batch.metrics`` holds the averaged metrics.   (notify)"""


HOOK_ORDER: tuple[str, ...] = (
    "configure",
    "adapted_params",
    "plugin_modules",
    "replay_safe",
    "batch_start",
    "task_start",
    "adapt",
    "inner_loss",
    "inner_grad",
    "inner_step",
    "after_inner_step",
    "outer_loss",
    "loss_modification",
    "task_end",
    "outer_step",
    "batch_end",
)
"""Hook names in the order they first fire."""

HOOK_MODES: dict[str, str] = {
    "adapted_params": "replace",
    "adapt": "replace",
    "inner_loss": "replace",
    "inner_grad": "replace",
    "inner_step": "replace",
    "outer_loss": "replace",
    "outer_step": "replace",
    "plugin_modules": "add",
    "replay_safe": "add",
    "loss_modification": "add",
}
"""Call mode of each hook; hooks not listed are 'notify'."""


def hook_mode(name: str) -> str:
    return HOOK_MODES.get(name, "notify")


__all__: list[Any] = ["hookimpl", "hookspec", "HOOK_ORDER", "HOOK_MODES", "hook_mode"]


def reference_markdown() -> str:
    """The hook reference as Markdown, generated from the specs above (docs/writing-plugins.md)."""
    import inspect
    import sys

    module = sys.modules[__name__]
    parts = []
    for number, name in enumerate(HOOK_ORDER, 1):
        spec = getattr(module, name)
        signature = str(inspect.signature(spec)).replace("'", "")
        doc = inspect.cleandoc(spec.__doc__ or "")
        parts.append(f"### {number}. `{name}{signature}`\n\n{doc}\n")
    return "\n".join(parts)
