"""PyTorch Lightning: meta-learning inside an existing ``LightningModule`` (``pip install lightning``; from a checkout ``pip install '.[lightning]'``).

Change ``class MyModule(L.LightningModule)`` to ``class MyModule(MetaLightningModule)``, build
the learner once in ``__init__`` (``self.configure_meta(self.model, plugins, ...)``) and return
``self.meta_step(batch)`` from ``training_step``; the batches are meta-batches (lists of tasks).
Everything else stays the user's: ``configure_optimizers`` (on ``self.parameters()``, which
include plugin-owned modules), callbacks, loggers, checkpoints, ``load_from_checkpoint``,
precision and strategy.

The step uses manual optimisation: ``learner.backward`` fills ``.grad`` (Sharp-MAML's outer SAM
needs the whole step), the meta-gradient is averaged over processes with one explicit
all-reduce (DDP's reducer never runs: in manual optimisation Lightning prepares it only in
``manual_backward``, and it would not see grad-of-grad), then the optimizer steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from metaopt.errors import ConfigError
from metaopt.learner import MetaLearner
from metaopt.task import TaskData

try:
    import lightning.pytorch as pl

    LIGHTNING_AVAILABLE = True
except ImportError:  # pragma: no cover - the extra is optional
    LIGHTNING_AVAILABLE = False
    pl = None  # type: ignore[assignment]


def _require() -> None:
    if not LIGHTNING_AVAILABLE:
        raise ConfigError(
            "PyTorch Lightning is not installed; pip install lightning (or, from a metaopt checkout, pip install '.[lightning]')."
        )


def mean_over_processes(flat: torch.Tensor) -> torch.Tensor:
    """Mean of ``flat`` over the default process group (one all-reduce); itself in one process."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return flat
    world = torch.distributed.get_world_size()
    if world == 1:
        return flat
    torch.distributed.all_reduce(flat)
    return flat / world


#: the key of a Lightning checkpoint that holds the learner's plugin state and meta-iteration
PLUGIN_STATE_KEY = "metaopt_plugin_state"

_Base: Any = pl.LightningModule if LIGHTNING_AVAILABLE else nn.Module


class MetaLightningModule(_Base):
    """A ``LightningModule`` whose training step is a metaopt meta-iteration.

    ``validation_step``/``test_step`` adapt to each task (the learner's eval inner steps) and
    log ``val_``/``test_`` + ``query_loss`` and ``accuracy`` (classification).
    """

    learner: MetaLearner
    #: the logged metric a ``ReduceLROnPlateau`` scheduler steps with (Lightning drops its ``monitor`` under
    #: manual optimisation)
    plateau_monitor: str | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        _require()
        super().__init__(*args, **kwargs)
        self.automatic_optimization = False

    def configure_meta(self, model: nn.Module, plugins: Sequence[object | str] = (), **learner_kwargs: Any) -> None:
        """Build ``self.learner`` around ``model`` (a submodule of this module) with ``plugins``."""
        self.learner = MetaLearner(model, plugins, **learner_kwargs)
        # one all-reduce per meta-gradient (also the first one Sharp-MAML's outer step perturbs along)
        self.learner.gradient_averager = mean_over_processes

    def meta_step(self, batch: Sequence[Any]) -> torch.Tensor:
        """One meta-iteration on a meta-batch: gradient, all-reduce, optimizer step; returns the meta-loss."""
        if not hasattr(self, "learner"):
            raise ConfigError("call self.configure_meta(model, plugins, ...) in __init__ before training.")
        precision = str(self.trainer.precision)
        if precision.startswith("16"):  # documented as refused; it used to run
            raise ConfigError(
                f"Trainer(precision={precision!r}) is not supported by metaopt: the inner loop's autograd.grad is "
                "not loss-scaled (float16 underflows), and on a GPU the scaler would unscale gradients that "
                "learner.backward never scaled. Use precision='bf16-mixed'."
            )
        optimizer = self.optimizers()
        optimizers = optimizer if isinstance(optimizer, list) else [optimizer]
        for opt in optimizers:
            opt.zero_grad()
        result = self.learner.backward(list(batch))  # .grad averaged over processes inside
        for opt in optimizers:
            opt.step()
        self._check_epoch_schedulers_ran()
        self._step_schedulers("step")
        metrics = {f"train_{k}": v for k, v in result.metrics.items()}
        self.log_dict(metrics, prog_bar=True, batch_size=len(batch), sync_dist=True)
        return result.loss.detach()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Adds the plugin state (schedule counters: MAML++'s annealing, SHOT's warm-up) and the meta-iteration,
        which are not parameters; without them a resumed fit restarted every schedule. If you override this
        hook, call ``super().on_save_checkpoint(checkpoint)``."""
        if hasattr(self, "learner"):
            checkpoint[PLUGIN_STATE_KEY] = {
                "plugins": self.learner.plugin_state(),
                "iteration": self.learner.iteration,
            }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restores what :meth:`on_save_checkpoint` added (``super().on_load_checkpoint`` if you override it)."""
        saved = checkpoint.get(PLUGIN_STATE_KEY)
        if saved is not None and hasattr(self, "learner"):
            self.learner.load_plugin_state(saved["plugins"])
            self.learner.iteration = int(saved["iteration"])

    def on_train_epoch_end(self) -> None:
        """Steps the schedulers whose interval is "epoch". If you override this hook, call
        ``super().on_train_epoch_end()`` (a missing call is an error at the next epoch's first step)."""
        self._step_schedulers("epoch")
        self._epoch_ends = getattr(self, "_epoch_ends", 0) + 1

    def _step_schedulers(self, interval: str) -> None:
        """Step the schedulers of ``configure_optimizers`` as Lightning does in automatic optimisation, which it
        skips in manual optimisation: per ``interval`` ("step": after each meta-step; "epoch": after each
        epoch, Lightning's default) and ``frequency``; ``ReduceLROnPlateau`` with ``plateau_monitor``'s value.
        (Every scheduler used to be stepped after every meta-step, so an epoch schedule ran per batch.)"""
        trainer = self.trainer
        index = 1 + (trainer.fit_loop.epoch_loop.batch_idx if interval == "step" else trainer.current_epoch)
        for config in trainer.lr_scheduler_configs:
            if config.interval != interval or index % config.frequency:
                continue
            metric = None
            if isinstance(config.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                metric = self._plateau_metric()
            self.lr_scheduler_step(config.scheduler, metric)

    def _plateau_metric(self) -> torch.Tensor:
        """The value ``ReduceLROnPlateau`` steps with: the logged metric named by ``plateau_monitor``."""
        logged = self.trainer.callback_metrics
        if self.plateau_monitor is None:
            raise ConfigError(
                "ReduceLROnPlateau needs the value it watches, and Lightning drops the scheduler's 'monitor' under "
                f"manual optimisation, which meta-learning uses; set plateau_monitor = 'NAME' on {type(self).__name__} "
                f"(a metric you log; logged now: {sorted(logged)})."
            )
        if self.plateau_monitor not in logged:
            raise ConfigError(
                f"plateau_monitor={self.plateau_monitor!r} has not been logged; logged are {sorted(logged)}. "
                "Log it with self.log, or name one of those."
            )
        return logged[self.plateau_monitor]

    def _check_epoch_schedulers_ran(self) -> None:
        """Refuse a meta-step in a new epoch when ``on_train_epoch_end`` (overridden without ``super()``) did not
        step the epoch schedulers, which would otherwise stay at their first value without a word."""
        trainer = self.trainer
        if not any(config.interval == "epoch" for config in trainer.lr_scheduler_configs):
            return
        if getattr(self, "_counted_for", None) != id(trainer):  # a new fit (or the first): count from here
            self._counted_for, self._first_epoch, self._epoch_ends = id(trainer), trainer.current_epoch, 0
        if self._epoch_ends < trainer.current_epoch - self._first_epoch:
            raise ConfigError(
                f"epoch {trainer.current_epoch} began but on_train_epoch_end did not step the epoch schedulers: "
                f"{type(self).__name__}.on_train_epoch_end overrides MetaLightningModule's; call "
                "super().on_train_epoch_end() in it."
            )

    def _evaluate(self, batch: Sequence[Any], prefix: str) -> dict[str, float]:
        # Lightning validates under inference_mode; adaptation needs autograd, and inference
        # tensors cannot be saved for backward: leave the mode and copy the task tensors
        with torch.inference_mode(False), torch.enable_grad():
            tasks = [TaskData(*(t.clone() for t in task)) for task in batch]
            result = self.learner.evaluate(tasks)
        metrics = {f"{prefix}_{k}": v for k, v in result.metrics.items() if k in ("query_loss", "accuracy")}
        self.log_dict(metrics, batch_size=len(batch), sync_dist=True)
        return metrics

    def validation_step(self, batch: Sequence[Any], batch_idx: int) -> dict[str, float]:
        return self._evaluate(batch, "val")

    def test_step(self, batch: Sequence[Any], batch_idx: int) -> dict[str, float]:
        return self._evaluate(batch, "test")
