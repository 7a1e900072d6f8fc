"""The accelerate bridge: devices, mixed precision and the outer backward.

``prepare(learner, accelerator)`` moves the learner (model and plugin modules) to the
accelerator's device and routes the outer backward through ``accelerator.backward`` and
every forward through ``accelerator.autocast()``.  With several processes the learner is not
wrapped in DDP: ``MetaLearner.backward`` averages the meta-gradient over processes itself
(one all-reduce per meta-iteration), each process adapting its own share of the tasks.
"""

from __future__ import annotations

from typing import Any

from metaopt.errors import ConfigError
from metaopt.learner import MetaLearner, as_tasks
from metaopt.task import TaskData

SUPPORTED_PRECISION = ("no", "bf16")


TRACKERS = ("tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab", "trackio")


def check_trackers(names: list[str]) -> None:
    """Each name must be an accelerate tracker whose package is installed."""
    import accelerate.utils as utils

    from metaopt.errors import suggest

    for name in names:
        if name not in TRACKERS:
            raise ConfigError(f"unknown tracker {name!r}.{suggest(name, TRACKERS)} Known: {', '.join(TRACKERS)}.")
        if not getattr(utils, f"is_{name}_available")():
            extra = (
                " (pip install tensorboard, or pip install '.[tensorboard]' from a checkout)"
                if name == "tensorboard"
                else ""
            )
            raise ConfigError(
                f"tracker {name!r} is not installed; install its package{extra} or drop it from log_with."
            )


def make_accelerator(
    precision: str = "no", cpu: bool = False, log_with: list[str] | None = None, project_dir: str | None = None
) -> Any:
    """An ``Accelerator`` (one or several processes, as launched); fp16 is refused (inner grads are unscaled)."""
    from accelerate import Accelerator

    if precision == "fp16":
        raise ConfigError(
            "mixed precision 'fp16' is not supported: the inner-loop gradients are not loss-scaled and "
            "underflow. Use precision='bf16' (same speed on recent hardware, no scaling needed)."
        )
    if precision not in SUPPORTED_PRECISION:
        raise ConfigError(f"precision={precision!r} must be one of {SUPPORTED_PRECISION}.")
    from accelerate.state import AcceleratorState

    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision", precision) != precision:
        # accelerate keeps one process-wide state; a new run with another precision replaces it
        # (the distributed PartialState is kept).
        AcceleratorState._reset_state(reset_partial_state=False)
    if log_with:
        check_trackers(log_with)
    return Accelerator(mixed_precision=precision, cpu=cpu, log_with=log_with or None, project_dir=project_dir)


def refuse_accumulation_with_outer_step(learner: MetaLearner, steps: int) -> None:
    """Accumulating ``steps`` micro-batches adds up their meta-gradients, which is the batch's only when the
    outer step is the default; a plugin that replaces it (Sharp-MAML's outer SAM) is refused."""
    replacing = learner.host.owners("outer_step")
    if steps > 1 and replacing:
        raise ConfigError(
            f"gradient_accumulation_steps={steps} with {', '.join(map(repr, replacing))}, which replaces the outer "
            "step: Sharp-MAML's outer SAM perturbs along the whole batch's meta-gradient, which one micro-batch does "
            "not have. Give each step the whole batch (a larger batch size, or more processes) instead of "
            "accumulating."
        )


def prepare(learner: MetaLearner, accelerator: Any) -> MetaLearner:
    """Attach ``accelerator`` to ``learner`` and move it to the accelerator's device.

    Use this instead of ``accelerator.prepare(learner)``: the learner must not be wrapped in
    DDP (see the module docstring).  Prepare your optimizer with ``accelerator.prepare`` as usual.
    """
    if accelerator.mixed_precision == "fp16":
        raise ConfigError("mixed precision 'fp16' is not supported by metaopt; use 'bf16'.")
    refuse_accumulation_with_outer_step(learner, accelerator.gradient_accumulation_steps)
    learner.to(accelerator.device)
    learner.accelerator = accelerator
    return learner


class LearnerState:
    """What ``accelerator.save_state`` must hold of a learner: meta-parameters (plugin modules
    included), plugin state (schedules, counters) and the meta-iteration; optionally the task sampler."""

    def __init__(self, learner: MetaLearner, sampler: Any = None) -> None:
        self.learner, self.sampler = learner, sampler

    def state_dict(self) -> dict[str, Any]:
        state = {
            "learner": self.learner.state_dict(),
            "plugin_state": self.learner.plugin_state(),
            "iteration": self.learner.iteration,
        }
        if self.sampler is not None:
            state["sampler"] = self.sampler.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.learner.load_state_dict(state["learner"])
        self.learner.load_plugin_state(state["plugin_state"])
        self.learner.iteration = int(state["iteration"])
        if self.sampler is not None:
            if "sampler" not in state:
                raise ConfigError("the saved state holds no task sampler; register the same objects as when saving.")
            self.sampler.load_state_dict(state["sampler"])


def register_for_checkpointing(accelerator: Any, learner: MetaLearner, sampler: Any = None) -> LearnerState:
    """Make ``accelerator.save_state()`` / ``load_state()`` save and restore the learner (and sampler).

    The learner is not ``accelerator.prepare``d (see :func:`prepare`), so accelerate does not
    know it: without this, ``load_state`` silently "resumes" without the meta-parameters.
    """
    state = LearnerState(learner, sampler)
    accelerator.register_for_checkpointing(state)
    return state


#: ``shard``'s ``loader`` when it is left out (``None`` says "not from a prepared loader")
_NOT_GIVEN: Any = object()


def shard(batch: Any, accelerator: Any, loader: Any = _NOT_GIVEN) -> list[TaskData]:
    """This process's tasks of a meta-batch, as a list of tasks.

    ``loader`` is where the batch came from.  A DataLoader passed through ``accelerator.prepare``
    already gives each process its own batch: it is used whole.  ``loader=None`` (or a loader that
    was not prepared) says every process drew the same batch: each takes every ``world``-th task
    (``tasks[rank::world]``).  With several processes the argument is required: slicing a prepared
    loader's batch again would silently drop half the tasks, and no batch says where it came from.
    ``batch`` may be a list of ``(sx, sy, qx, qy)`` tasks or four tensors stacked over tasks (a
    ``DataLoader``'s default collation).
    """
    from accelerate.data_loader import DataLoaderDispatcher, DataLoaderShard

    tasks = as_tasks(batch)
    world = getattr(accelerator, "num_processes", 1) if accelerator is not None else 1
    if world == 1:
        return tasks
    if loader is _NOT_GIVEN:
        raise ConfigError(
            f"shard(batch, accelerator) with {world} processes needs the loader the batch came from: "
            "shard(batch, accelerator, loader). A loader passed through accelerator.prepare already gives each "
            "process its own tasks (used whole); loader=None means every process drew the same batch (each takes "
            "every world-th task). Guessing wrong would silently drop or repeat tasks."
        )
    if isinstance(loader, DataLoaderShard | DataLoaderDispatcher):
        return tasks
    rank = accelerator.process_index
    if len(tasks) % world:
        raise ConfigError(
            f"a meta-batch of {len(tasks)} tasks does not split evenly over {world} processes; use a meta-batch "
            f"that is a multiple of {world}."
        )
    return tasks[rank::world]
