"""``MetaLearner``: the generic differentiable inner/outer loop, driven by hooks."""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from metaopt.backend import HigherBackend, make_backend
from metaopt.engines import (
    CompileEngine,
    EngineContext,
    LoopEngine,
    VmapEngine,
    check_engine,
    choose_engine,
    compile_refusals,
    make_task,
    vmap_refusals,
)
from metaopt.errors import ConfigError, DataError, MetaOptError, PluginError, PluginHookError, suggest
from metaopt.inner_optim import is_plain_sgd, make_template
from metaopt.manager import PluginHost
from metaopt.models import has_batchnorm
from metaopt.recompute import MEMORY_MODES, REPLAYED_HOOKS
from metaopt.task import Batch, Params, Task, TaskData, Trajectory, TrajectoryFactory

BatchInput = Sequence[TaskData] | Sequence[Sequence[torch.Tensor]] | Sequence[torch.Tensor]
#: data-parallel wrappers a learner cannot be built on (checked by class name: FSDP may not import)
WRAPPERS = ("DistributedDataParallel", "DataParallel", "FullyShardedDataParallel")


@dataclass
class BatchResult:
    """What one meta-batch produced: the meta-loss (a tensor) and averaged float metrics."""

    loss: torch.Tensor
    metrics: dict[str, float]
    per_task: dict[str, list[float]]


class ExtraOutputsWarning(UserWarning):
    """A classifier with more outputs than the tasks have classes (checked on the first batch)."""


class SingleExampleBatchNormWarning(UserWarning):
    """A transductive-BatchNorm prediction on one example (its own statistics: a worse answer)."""


def as_tasks(batch: BatchInput) -> list[TaskData]:
    """Accept a list of ``(sx, sy, qx, qy)`` tuples, or four tensors stacked over tasks."""
    items = list(batch)
    if len(items) == 4 and all(isinstance(t, torch.Tensor) for t in items):
        sx, sy, qx, qy = items
        if not (sx.shape[0] == sy.shape[0] == qx.shape[0] == qy.shape[0]):
            raise DataError(
                f"a stacked batch must have the task count first in all four tensors; got leading "
                f"sizes {[t.shape[0] for t in items]}."
            )
        one_task = min(t.dim() for t in items) < 2 or (sx.shape[1] == 1 and qx.shape[1] == 1)
        if one_task:  # read as stacked, these would be tasks of one example (or none) each, silently
            raise DataError(
                f"four tensors of shapes {[tuple(t.shape) for t in items]} read as a stacked batch (the task count "
                f"first) would make {sx.shape[0]} tasks of one support and one query example each (or scalar "
                "labels): this looks like ONE task. Pass a list of tasks, [task], or stack tasks as "
                "[tasks, examples, ...]."
            )
        return [TaskData(sx[i], sy[i], qx[i], qy[i]) for i in range(sx.shape[0])]
    # tuple.__new__: TaskData(*item) would run the named tuple's Python-level __new__ for every task
    tasks = [
        item if type(item) is TaskData else _from_mapping(i, item) if isinstance(item, Mapping) else
        tuple.__new__(TaskData, item)
        for i, item in enumerate(items)
    ]  # fmt: skip
    if set(map(len, tasks)) - {4}:
        i, task = next((i, task) for i, task in enumerate(tasks) if len(task) != 4)
        raise DataError(f"task {i} has {len(task)} parts; expected (support_x, support_y, query_x, query_y).")
    if not tasks:
        raise DataError("the meta-batch is empty; pass at least one task.")
    return tasks


def _from_mapping(i: int, item: Mapping[str, Any]) -> TaskData:
    """A task given as a dict with the four fields (iterating it gave its keys: strings, not tensors)."""
    missing = [k for k in TaskData._fields if k not in item]
    if missing:
        raise DataError(
            f"task {i} is a mapping without {missing}; give {list(TaskData._fields)} (it has {list(item)})."
        )
    return TaskData(*(item[k] for k in TaskData._fields))


def _check_inputs(tasks: list[TaskData]) -> None:
    """Raw ``uint8`` pixels never reach the model: no model is meant to see 0..255 (some cast silently)."""
    if torch.uint8 not in {task[0].dtype for task in tasks} | {task[2].dtype for task in tasks}:
        return
    for i, task in enumerate(tasks):
        for name in ("support_x", "query_x"):
            x = getattr(task, name)
            if x.dtype == torch.uint8:
                raise DataError(
                    f"task {i}: {name} is uint8 (raw pixels, values {int(x.min())}..{int(x.max())}); the model would "
                    "train on 0..255. Collate the tasks with metaopt.data.collate_tasks (DataLoader(..., "
                    "collate_fn=collate_tasks)), which turns uint8 into float32 in [0, 1], or convert them yourself."
                )


def _check_task(i: int, task: TaskData) -> None:
    if task.support_x.shape[0] != task.support_y.shape[0] or task.query_x.shape[0] != task.query_y.shape[0]:
        raise DataError(
            f"task {i}: inputs and labels differ in length (support {task.support_x.shape[0]} vs "
            f"{task.support_y.shape[0]}, query {task.query_x.shape[0]} vs {task.query_y.shape[0]})."
        )
    if task.support_x.shape[1:] != task.query_x.shape[1:]:
        raise DataError(
            f"task {i}: support inputs {tuple(task.support_x.shape[1:])} and query inputs "
            f"{tuple(task.query_x.shape[1:])} differ in shape."
        )


def _explain_missing_double_backward(exc: BaseException) -> ConfigError | None:
    """Advice for torch's "derivative for X is not implemented"; None for any other error."""
    cause = exc.__cause__ if isinstance(exc, PluginHookError) else exc
    text = str(cause)
    if not (isinstance(cause, RuntimeError) and "derivative for" in text and "not implemented" in text):
        return None
    op = text.split("derivative for", 1)[1].split("is not implemented")[0].strip()
    return ConfigError(
        f"the model uses an operation without a double backward ({op}), which a second-order "
        "meta-gradient needs (e.g. hard-swish/hard-sigmoid in MobileNetV3, fused attention kernels). "
        "Use first_order=True (or the fomaml / convergent_fo plugin), or build the model without that "
        "operation (e.g. another activation; timm attention via metaopt.integrations.timm.backbone)."
    )


def check_labels(task: TaskData, output: torch.Tensor, loss_fn: Callable[..., torch.Tensor]) -> None:
    """Class-index labels: 0..N-1 in the support, query labels among them, N <= model outputs.

    For the built-in MSE loss the target shape must equal the output shape (no silent
    broadcasting).  Other loss functions are the user's business.
    """
    sy, qy = task.support_y, task.query_y
    if sy.dtype != qy.dtype:
        raise DataError(f"support labels are {sy.dtype} but query labels are {qy.dtype}; use one dtype.")
    if loss_fn is F.cross_entropy and not sy.is_floating_point():
        classes = torch.unique(sy).tolist()
        n = len(classes)
        if classes != list(range(n)):
            raise DataError(
                f"support labels must be 0..N-1 for an N-way task; got {classes}. Relabel each task's classes "
                "to 0..N-1 (e.g. with torch.unique(y, return_inverse=True))."
            )
        extra = sorted(set(torch.unique(qy).tolist()) - set(classes))
        if extra:
            raise DataError(f"query labels {extra} do not occur in the support labels {classes}.")
        if output.dim() != 2 or output.shape[1] < n:
            raise DataError(
                f"the model outputs shape {tuple(output.shape)} but tasks have {n} classes; give the model a "
                f"head with {n} outputs (e.g. num_classes={n})."
            )
        if output.shape[1] > n:  # e.g. a pretrained 1000-class head kept by mistake
            warnings.warn(
                f"the model has {output.shape[1]} outputs but tasks have {n} classes: the other "
                f"{output.shape[1] - n} logits share the softmax, which is not {n}-way classification. Give the "
                f"model a head with {n} outputs (e.g. num_classes={n}), unless that is what you mean.",
                ExtraOutputsWarning,
                stacklevel=5,
            )
    if loss_fn is F.mse_loss and output.shape != sy.shape:
        raise DataError(
            f"the model outputs shape {tuple(output.shape)} but support targets have shape {tuple(sy.shape)}; "
            "MSE would broadcast them silently. Reshape the targets to the output's shape."
        )


class MetaLearner(nn.Module):
    """Meta-learn a model's initialisation with plugins.

    Args:
        model: any ``nn.Module``; its trainable parameters are the meta-parameters.
        plugins: plugin instances (or names, created with default options), in order.
        inner_steps: gradient steps per task during training.
        inner_lr: inner learning rate, or one per step.
        loss_fn: ``loss_fn(output, target)``; default cross-entropy.
        first_order: drop the second-order terms (FOMAML-style meta-gradient).
        inner_optimizer: ``"sgd"`` (default), ``"adam"`` (``torch.optim.Adam``'s update exactly),
            ``"higher_adam"``, ``"rmsprop"``, ``"adagrad"``; all differentiable.
        bn_policy: ``"transductive"`` or ``"running"`` (see ``metaopt.backend.BN_POLICIES``).
        backend: ``"higher"`` (default, the project's engine) or ``"torch.func"``; both give
            the same meta-gradients (tested); see docs/benchmarks/speed.md for their costs.
        eval_inner_steps: inner steps at evaluation (default: ``inner_steps``).
        check_finite: raise :class:`~metaopt.errors.NumericalError` at the first NaN/inf loss
            or gradient (default on; costs one device sync per checked value).
        per_task_backward: in ``backward``, backpropagate each task's loss as soon as the task
            ends (default: one task's graph in memory at a time); False: one backward of the
            batch mean (fewer autograd calls, every task's graph in memory until the end).
            Same gradient either way; a plugin that replaces ``outer_step`` always gets the batch graph.
        engine: ``"loop"`` (default: task by task), ``"vmap"`` (every task of a meta-batch at once,
            ``torch.func.vmap`` over tasks; same hooks, same meta-gradient) or ``"auto"`` (vmap
            for models without convolutions, else loop; see docs/engines.md).
        task_chunk: with the vmap engine, tasks per vmap call (default: the whole batch); each
            chunk is backpropagated before the next, so a smaller chunk holds less memory.
        memory: ``"keep"`` (default: every inner step's graph until the outer backward) or
            ``"recompute"`` (only the parameters after each step; each step's graph is recomputed
            when the outer backward reaches it: the same second-order meta-gradient in memory
            that does not grow with ``inner_steps``, for about one extra forward and backward
            per step; see metaopt.recompute).
    """

    def __init__(
        self,
        model: nn.Module,
        plugins: Sequence[object | str] = (),
        *,
        inner_steps: int = 1,
        inner_lr: float | Sequence[float] = 0.01,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        first_order: bool = False,
        inner_optimizer: str = "sgd",
        inner_optimizer_kwargs: dict[str, Any] | None = None,
        bn_policy: str = "transductive",
        eval_inner_steps: int | None = None,
        check_finite: bool = True,
        backend: str = "higher",
        per_task_backward: bool = True,
        engine: str = "loop",
        task_chunk: int | None = None,
        memory: str = "keep",
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model must be a torch.nn.Module; got {type(model).__name__}.")
        if type(model).__name__ in WRAPPERS and hasattr(model, "module"):
            raise ConfigError(
                f"the model is wrapped in {type(model).__name__} (accelerator.prepare(model)?). Build the learner on "
                "the plain model (accelerator.unwrap_model(model), or the model before prepare) and use "
                "metaopt.integrations.accelerate.prepare(learner, accelerator): metaopt averages the meta-gradient "
                "over processes itself; DDP would not see the gradients through the functional inner loop."
            )
        if not isinstance(inner_steps, int) or inner_steps < 0:
            raise ConfigError(f"inner_steps={inner_steps!r} must be an integer >= 0.")
        if eval_inner_steps is not None and (not isinstance(eval_inner_steps, int) or eval_inner_steps < 0):
            raise ConfigError(f"eval_inner_steps={eval_inner_steps!r} must be an integer >= 0 or None.")
        lrs = [inner_lr] if isinstance(inner_lr, int | float) else list(inner_lr)
        if not lrs or any(not isinstance(lr, int | float) or not (math.isfinite(lr) and lr > 0) for lr in lrs):
            raise ConfigError(
                f"inner_lr={inner_lr!r} must be a positive finite number (or a list of them, one per step)."
            )
        if len(lrs) > 1 and len(lrs) < max(inner_steps, eval_inner_steps or 0):
            raise ConfigError(
                f"inner_lr has {len(lrs)} per-step values but up to {max(inner_steps, eval_inner_steps or 0)} steps run; "
                "give one value per step or a single number."
            )
        self.model = model
        #: step counts and rates of the inner loop; its optimizer template is set once plugins chose the adapted set
        self.trajectories = TrajectoryFactory(
            inner_steps, inner_steps if eval_inner_steps is None else eval_inner_steps, [float(lr) for lr in lrs], None
        )
        self.loss_fn = loss_fn or F.cross_entropy
        self.first_order = bool(first_order)
        self.inner_optimizer_name = inner_optimizer
        self.inner_optimizer_kwargs = dict(inner_optimizer_kwargs or {})
        self.backend = make_backend(backend, model, bn_policy)
        self.accelerator: Any = None
        #: the mean over processes of a flat tensor, when there is no accelerator (set by trainer
        #: integrations, e.g. Lightning's explicit all-reduce); None: one process
        self.gradient_averager: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.iteration = 0
        self.per_task_backward = bool(per_task_backward)

        from metaopt.registry import create_plugin

        if isinstance(plugins, str | bytes) or not isinstance(plugins, Sequence):
            raise ConfigError(
                f"plugins must be a list (of plugin instances, names or spec strings such as 'shot:weight=0.1'); "
                f"got {type(plugins).__name__} {plugins!r}. Did you mean plugins=[{plugins!r}]?"
            )
        instances = [create_plugin(p) if isinstance(p, str) else p for p in plugins]
        self.host = PluginHost(instances, check_finite=check_finite)
        self.hook.configure(learner=self)
        candidates = [n for n, p in model.named_parameters() if p.requires_grad]
        if not candidates:
            raise ConfigError(
                f"the model ({type(model).__name__}) has no trainable parameters (none, or all requires_grad=False); "
                "there is nothing to meta-learn."
            )
        adapted = self.hook.adapted_params(learner=self, candidates=candidates)
        unknown = [n for n in adapted if n not in candidates]
        if unknown:
            raise PluginError(f"adapted_params returned names that are not trainable parameters: {unknown}.")
        self.adapted_names: list[str] = list(adapted)
        modules: dict[str, nn.Module] = {}
        for result in self.hook.plugin_modules(learner=self):
            for key, module in (result or {}).items():
                if key in modules:
                    raise PluginError(f"two plugins declare a module named {key!r}; names must be unique.")
                modules[key] = module
        self.plugin_modules = nn.ModuleDict(modules)
        template = make_template(
            inner_optimizer,
            [p for n, p in model.named_parameters() if n in self.adapted_names],
            **self.inner_optimizer_kwargs,
        )
        self.trajectories.template = template
        self._validated = False
        check_engine(engine)
        if task_chunk is not None and (not isinstance(task_chunk, int) or task_chunk < 1):
            raise ConfigError(f"task_chunk={task_chunk!r} must be a positive integer (or None: the whole batch).")
        self.engine, self.task_chunk = engine, task_chunk
        #: the per-batch hooks (no or one plain implementation: called directly, see metaopt.manager.direct_caller)
        self._direct_hook = self.host.hook_without(None)
        #: the public pieces every engine runs on (engines never see the learner itself)
        self.engine_context = EngineContext(
            learner=self,
            model=model,
            hook=self.host.hook,
            backend=self.backend,
            trajectories=self.trajectories,
            plugins=list(zip(self.host.names, self.host.plugins, strict=True)),
            adapted_names=self.adapted_names,
            first_order=self.first_order,
            inner_optimizer_name=inner_optimizer,
            inner_optimizer_kwargs=self.inner_optimizer_kwargs,
            uses_momentum=any(g.get("momentum") for g in template.param_groups),
            task_chunk=task_chunk,
            finite_check=self.host.finite_check,
            device=self.device,
            autocast=self.autocast,
            memory=memory,
            meta_parameters=lambda: list(self.meta_parameters()),
            holder=self,
            plain_backward=lambda: self.accelerator is None,
            vectorised_hook=self._direct_hook
            if self.host.finite_check is None
            else self.host.hook_without(self.host.finite_check),
        )
        if memory not in MEMORY_MODES:
            raise ConfigError(
                f"memory={memory!r} is not known; use one of {MEMORY_MODES}.{suggest(memory, MEMORY_MODES)}"
            )
        self.memory = memory
        if memory == "recompute":
            refused = self.recompute_refusals()
            if refused:
                raise ConfigError(
                    "memory='recompute' cannot run this learner: " + "; ".join(refused) + ". Use memory='keep'."
                )
        #: why engine="vmap" cannot run this learner (empty when it can)
        self.vmap_reasons = vmap_refusals(self.engine_context)
        compile_only = compile_refusals(self.engine_context) if engine == "compile" else []
        refused = self.vmap_reasons + compile_only
        if engine in ("vmap", "compile") and refused:
            instead = "engine='vmap' or 'loop'" if not self.vmap_reasons else "engine='loop'"
            raise ConfigError(
                f"engine={engine!r} cannot run this learner: "
                + "; ".join(refused)
                + f". Use {instead} (or 'auto', which runs a supported engine for it)."
            )
        #: the engines this learner has run, by name (built when first needed)
        self.engines: dict[str, Any] = {"loop": LoopEngine()}
        #: the engine that ran the latest batch ("loop" or "vmap"; what engine="auto" chose)
        self.last_engine: str | None = None

    def recompute_refusals(self) -> list[str]:
        """Why ``memory="recompute"`` cannot run this learner (empty: it can), one reason each."""
        reasons = []
        template = self.trajectories.template
        if not (is_plain_sgd(template) or getattr(template, "metaopt_exact_adam", False)):
            reasons.append(
                f"inner_optimizer={self.inner_optimizer_name!r} with {self.inner_optimizer_kwargs} keeps its state "
                "inside higher's optimizer, which a recomputed step cannot restore (use 'sgd' or 'adam')"
            )
        answers = {impl.plugin_name: impl.function(self) for impl in self.hook.replay_safe.get_hookimpls()}
        hooks: dict[str, list[str]] = {}
        for name in (*REPLAYED_HOOKS, "adapt"):
            for impl in getattr(self.hook, name).get_hookimpls():
                if not impl.plugin_name.startswith("builtin:"):
                    hooks.setdefault(impl.plugin_name, []).append(name)
        for plugin, names in hooks.items():
            answer = answers.get(plugin)
            if answer is not True:
                why = answer if isinstance(answer, str) else "does not declare replay_safe (docs/writing-plugins.md)"
                reasons.append(f"plugin {plugin!r} implements {names} (hooks of the recomputed inner loop) and {why}")
        return reasons

    # -- settings the inner loop reads (held by the trajectory factory) ------------------
    @property
    def inner_steps(self) -> int:
        return self.trajectories.inner_steps

    @inner_steps.setter
    def inner_steps(self, value: int) -> None:
        self.trajectories.inner_steps = value

    @property
    def eval_inner_steps(self) -> int:
        return self.trajectories.eval_inner_steps

    @eval_inner_steps.setter
    def eval_inner_steps(self, value: int) -> None:
        self.trajectories.eval_inner_steps = value

    @property
    def inner_lrs(self) -> list[float]:
        return self.trajectories.inner_lrs

    @inner_lrs.setter
    def inner_lrs(self, value: list[float]) -> None:
        self.trajectories.inner_lrs = value

    # -- plugins ---------------------------------------------------------------------
    @property
    def hook(self) -> Any:
        return self.host.hook

    @property
    def plugins(self) -> list[object]:
        return list(self.host.plugins)

    def get_plugin(self, name: str) -> object | None:
        return self.host.plugin(name)

    def describe(self) -> str:
        """Per hook, in firing order, which plugins implement it."""
        return self.host.describe()

    def meta_parameters(self) -> Iterator[nn.Parameter]:
        """Everything the outer optimizer updates: the model's and plugin-owned parameters."""
        return (p for p in self.parameters() if p.requires_grad)

    # -- the loop --------------------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The accelerator's autocast (mixed precision), else a no-op context."""
        if self.accelerator is not None:
            return self.accelerator.autocast()
        return contextlib.nullcontext()

    def device(self) -> torch.device:
        """The device of the model's parameters."""
        for p in self.model.parameters():
            return p.device
        return torch.device("cpu")

    def start_params(self, training: bool, named: Params | None = None) -> Params:
        return self.engine_context.start_params(training, named)

    def lrs_for(self, steps: int, lr_scale: float = 1.0, lr: float | Sequence[float] | None = None) -> list[float]:
        return self.trajectories.lrs_for(steps, lr_scale, lr)

    def new_trajectory(
        self,
        task: Task,
        steps: int | None,
        lr_scale: float = 1.0,
        *,
        lr: float | Sequence[float] | None = None,
        start: Params | None = None,
        main: bool = True,
    ) -> Trajectory:
        """A new inner trajectory for ``task`` (plugins use it for a second inner loop)."""
        return self.trajectories.new(task, steps, lr_scale, lr=lr, start=start, main=main)

    def engine_for(self, data: list[TaskData]) -> str:
        """The engine that runs a batch: ``"loop"`` or ``"vmap"`` (``engine="auto"`` decides here)."""
        return choose_engine(self.engine_context, data) if self.engine == "auto" else self.engine

    def run_tasks(self, batch: Batch) -> torch.Tensor:
        """Adapt to every task in the batch and return the mean outer loss (through the chosen engine)."""
        name = self.last_engine = self.engine_for(batch.data)
        if name == "loop":
            batch.meta_loss = self.engines["loop"].run(batch, self.engine_context)
            return batch.meta_loss
        if name not in self.engines:
            self.engines[name] = (CompileEngine if name == "compile" else VmapEngine)(self.engine_context)
        try:
            batch.meta_loss = self.engines[name].run(batch, self.engine_context, stacks=self.engine == "auto")
        except PluginHookError as exc:
            cause = exc.__cause__
            if not isinstance(cause, RuntimeError) or isinstance(cause, MetaOptError):
                raise  # the hook's own error (a plugin's check, a ValueError): nothing about vmap to add
            raise PluginHookError(
                f"{exc} [engine={name!r}: hooks run once for all tasks, inside torch.func.vmap; a hook must take "
                "gradients with task.grad(...) / task.inner_grad_at(...), not torch.autograd.grad, and must not "
                "read values (.item(), float(), if on a tensor). Use engine='loop' for this plugin.]",
                plugin=exc.plugin,
                hook=exc.hook,
            ) from exc.__cause__
        return batch.meta_loss

    def _begin(self, tasks: BatchInput, training: bool) -> Batch:
        data = as_tasks(tasks)
        _check_inputs(data)
        if not self._validated:
            for i, task in enumerate(data):
                _check_task(i, task)
            self._check_against_model(data[0])
            self._validated = True
        batch = Batch(learner=self, data=data, training=training, runner=self.run_tasks, backward_fn=self.backward_loss)
        self._direct_hook.batch_start(batch=batch)
        return batch

    def _finish(self, batch: Batch) -> BatchResult:
        if batch._tasks is None and batch.stacked is not None:  # vmap engine, no per-task records read
            stacked = dict(sorted(batch.stacked[1].items()))
        else:
            keys = sorted({k for t in batch.tasks for k in t.metrics})
            stacked = {k: torch.stack([t.metrics[k] for t in batch.tasks if k in t.metrics]) for k in keys}
        # one read per metric: the per-task values (floats in the metric's own precision), averaged in Python
        per_task = {k: (v if v.is_floating_point() else v.float()).tolist() for k, v in stacked.items()}
        batch.metrics = {
            k: sum(values) / len(values) if v.dim() == 1 else float(v.float().mean())
            for (k, values), v in zip(per_task.items(), stacked.values(), strict=True)
        }
        assert batch.meta_loss is not None
        batch.metrics["meta_loss"] = float(batch.meta_loss.detach())
        self._direct_hook.batch_end(batch=batch)
        return BatchResult(loss=batch.meta_loss, metrics=dict(batch.metrics), per_task=per_task)

    def _check_against_model(self, task: TaskData) -> None:
        """One no-grad forward on the first task: inputs, outputs and labels must fit the model."""
        x = task.support_x.to(self.device())
        was_training = self.model.training
        self.model.eval()  # no BatchNorm statistics or dropout state change
        try:
            with torch.no_grad(), self.autocast():
                output = self.model(x)
        except Exception as exc:
            raise DataError(
                f"the model cannot take the support inputs (shape {tuple(x.shape)}, dtype {x.dtype}): "
                f"{type(exc).__name__}: {str(exc)[:300]}. Check the input size, channels and dtype "
                f"(model parameters are {next(self.model.parameters()).dtype})."
            ) from exc
        finally:
            self.model.train(was_training)
        if isinstance(output, torch.Tensor):
            check_labels(task, output, self.loss_fn)
        stale = self.backend.stale_reads(x, self.adapted_names) if isinstance(self.backend, HigherBackend) else []
        if stale:
            raise ConfigError(
                f"backend='higher' would hand the model's forward the original values of {stale[:3]}, not the "
                "adapted ones: the forward reads them outside their own module's forward (e.g. "
                "F.layer_norm(h, shape, self.norm.weight, ...), a weight tied by reading another module's, or a "
                "forward pre-hook such as torch.nn.utils.weight_norm's), and higher swaps a module's parameters only "
                "when that module is called. The inner loop's updates to "
                "them would be lost. Use backend='torch.func' (CLI --backend torch.func), which runs the forward "
                "with every parameter replaced, or engine='vmap'."
            )

    @property
    def num_processes(self) -> int:
        return int(getattr(self.accelerator, "num_processes", 1) or 1)

    def sync_gradients(self) -> None:
        """Average ``.grad`` of every meta-parameter over processes (one all-reduce).

        Data-parallel over tasks: each process adapts its own share of the meta-batch and
        ``.grad`` becomes the mean over processes, i.e. the meta-gradient of the whole batch
        when every process holds the same number of tasks.  DDP is not used: it would not see
        the gradients that flow through higher's functional copies, and it never syncs
        grad-of-grad.  A no-op with one process.
        """
        if self.accelerator is not None:
            if self.num_processes <= 1:
                return
            mean = functools.partial(self.accelerator.reduce, reduction="mean")
        elif self.gradient_averager is not None:
            mean = self.gradient_averager
        else:
            return
        params = list(self.meta_parameters())
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
        flat = mean(torch.cat([g.reshape(-1) for g in grads]))
        offset = 0
        for p in params:
            p.grad = flat[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()

    def backward_loss(self, loss: torch.Tensor) -> None:
        if self.accelerator is not None:
            self.accelerator.backward(loss)
        else:
            loss.backward()

    def forward(self, tasks: BatchInput) -> BatchResult:
        """The meta-loss of a batch (graph kept; call ``.loss.backward()`` yourself).

        Refused when a plugin replaces the outer step (Sharp-MAML's outer SAM): its meta-gradient is
        not the gradient of any one loss, and ``.loss.backward()`` silently gave plain MAML's.
        """
        owners = self.host.owners("outer_step")
        if owners:
            raise ConfigError(
                f"learner(tasks) returns a meta-loss for loss.backward(), but {', '.join(map(repr, owners))} "
                "replaces the outer step (Sharp-MAML's outer SAM takes a second pass at perturbed parameters), so "
                "loss.backward() would give plain MAML's meta-gradient. Use learner.backward(tasks), which runs "
                "that outer step; to add terms of your own, backpropagate them before or after it (the gradients add)."
            )
        batch = self._begin(tasks, training=True)
        self.run_tasks(batch)
        return self._finish(batch)

    def backward(self, tasks: BatchInput) -> BatchResult:
        """One meta-iteration's gradient: replaces ``loss.backward()`` in a training loop.

        Runs every task's inner loop, then the ``outer_step`` hook, which accumulates the
        meta-gradient into ``.grad`` of ``learner.parameters()``.  Step your optimizer after.
        Unless a plugin replaces ``outer_step`` (or ``per_task_backward=False``), each task's loss
        is backpropagated as soon as the task ends, so only one task's graph is in memory (the
        returned loss is then detached).
        """
        batch = self._begin(tasks, training=True)
        # the default outer step needs no batch graph: free each task's graph after its backward
        batch.backward_per_task = self.per_task_backward and not self.host.replaced("outer_step")
        params = batch.meta_params = list(self.meta_parameters())
        earlier = [p.grad for p in params]  # this batch accumulates apart: a failure leaves .grad as it was
        for p in params:
            p.grad = None
        try:
            self.run_tasks(batch)
            done = self.hook.outer_step(batch=batch)
            if not done:
                raise PluginError("no outer_step implementation returned True; the meta-gradient was not computed.")
        except BaseException as exc:
            for p, before in zip(params, earlier, strict=True):
                p.grad = before
            advice = _explain_missing_double_backward(exc)
            if advice is None:
                raise
            raise advice from exc
        for p, before in zip(params, earlier, strict=True):
            if before is not None:
                p.grad = before if p.grad is None else p.grad.add_(before)
        self.sync_gradients()
        self.iteration += 1
        return self._finish(batch)

    def evaluate(self, tasks: BatchInput, steps: int | None = None) -> BatchResult:
        """Adapt to each task (``steps`` inner steps) and report query metrics; no meta-graph."""
        saved = self.eval_inner_steps
        if steps is not None:
            if steps < 0:
                raise ConfigError(f"steps={steps!r} must be >= 0.")
            self.eval_inner_steps = steps
        try:
            batch = self._begin(tasks, training=False)
            self.run_tasks(batch)
            result = self._finish(batch)
        finally:
            self.eval_inner_steps = saved
        return BatchResult(loss=result.loss.detach(), metrics=result.metrics, per_task=result.per_task)

    def adapt(self, task: TaskData | Sequence[torch.Tensor], steps: int | None = None) -> Params:
        """Adapted parameters for one task (detached from the meta-parameters)."""
        data = _from_mapping(0, task) if isinstance(task, Mapping) else TaskData(*task)
        _check_inputs([data])
        _check_task(0, data)
        if not self._validated:  # a learner used only through adapt / predict (e.g. loaded from a checkpoint)
            self._check_against_model(data)
            self._validated = True
        self.backend.prepare(False)
        if self.host.finite_check is not None:
            self.host.finite_check.reset(self.iteration + 1)
        moved = tuple(t.to(self.device(), non_blocking=True) for t in data)
        t = make_task(self.engine_context, 0, moved, False, self.start_params(False))
        try:
            with torch.enable_grad(), self.autocast():
                self.hook.task_start(task=t)
                params = self.hook.adapt(task=t, trajectory=self.new_trajectory(t, steps))
        finally:
            self.backend.release()
        if self.host.finite_check is not None:
            self.host.finite_check.flush(self)  # no batch_end here: read this task's flags now
        return {n: p.detach() for n, p in params.items()}

    def predict(
        self, task: TaskData | Sequence[torch.Tensor], x: torch.Tensor | None = None, steps: int | None = None
    ) -> torch.Tensor:
        """Adapt to ``task`` and return the adapted model's output on ``x`` (default: its query inputs).

        The forward uses the learner's BatchNorm policy, as training and ``evaluate`` do: with
        ``bn_policy="transductive"`` (the default) BatchNorm normalises ``x`` with its own batch
        statistics, so predict a whole query set at once, not one image at a time.  (The
        adapted parameters of :meth:`adapt` fed to ``functional_call(model.eval(), ...)`` would
        use running statistics that transductive training never wrote: chance accuracy.)
        """
        data = _from_mapping(0, task) if isinstance(task, Mapping) else TaskData(*task)
        params = self.adapt(data, steps)
        if x is not None:
            _check_inputs([TaskData(data.support_x, data.support_y, x, data.query_y)])
        inputs = (data.query_x if x is None else x).to(self.device())
        if inputs.shape[0] == 1 and self.backend.bn_policy == "transductive" and has_batchnorm(self.model):
            warnings.warn(
                "learner.predict on a batch of 1 example under bn_policy='transductive': BatchNorm normalises it "
                "with its own statistics, not as the model was trained (on whole support and query sets), which "
                "gives worse predictions. Predict the whole query set at once, or train with bn_policy='running' "
                "for single-example predictions.",
                SingleExampleBatchNormWarning,
                stacklevel=2,
            )
        self.backend.prepare(False)
        try:
            with torch.no_grad(), self.autocast():
                return self.backend.forward(inputs, params)
        finally:
            self.backend.release()

    # -- state ----------------------------------------------------------------------
    def plugin_state(self) -> dict[str, Any]:
        """State of every plugin that has ``state_dict`` (e.g. warm-up counters)."""
        return {
            name: plugin.state_dict()
            for name, plugin in zip(self.host.names, self.host.plugins, strict=True)
            if hasattr(plugin, "state_dict")
        }

    def load_plugin_state(self, state: dict[str, Any]) -> None:
        for name, plugin in zip(self.host.names, self.host.plugins, strict=True):
            if name in state:
                if not hasattr(plugin, "load_state_dict"):
                    raise MetaOptError(f"plugin {name!r} has saved state but no load_state_dict().")
                plugin.load_state_dict(state[name])
