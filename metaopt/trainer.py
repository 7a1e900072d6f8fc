"""A full trainer for users without a loop: progress bar, evaluation, JSON-lines logs, checkpoints."""

from __future__ import annotations

import collections
import contextlib
import json
import math
import platform
import shutil
import signal
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from metaopt.allocator import keep_freed_memory
from metaopt.checkpoint import rng_state, save_atomic, seed_everything, set_rng_state
from metaopt.config import RESUME_SAFE_KEYS, TrainConfig, plugin_specs
from metaopt.data.record import check_unchanged, data_record, read_record, split_record, warn_if_trained_on
from metaopt.data.sampler import TaskSampler
from metaopt.data.sources import make_sampler
from metaopt.errors import CheckpointError, ConfigError, DataError, NumericalError, TrainingInterrupted
from metaopt.learner import MetaLearner
from metaopt.models import OWN_IMAGE_MODELS, REGRESSION_MODELS, conv4, create_model, mlp
from metaopt.numerics import all_finite
from metaopt.optim import make_outer_optimizer, param_groups
from metaopt.registry import create_plugin
from metaopt.rundir import (
    BEST_FILE,
    CHECKPOINT_DIR,
    CONFIG_FILE,
    DATA_FILE,
    METRICS_FILE,
    RunDirWarning,
    RunLock,
    check_writable,
    checkpoint_files,
    config_differences,
    disk_error,
    is_run,
    load_verified,
    newest_intact,
    read_json_object,
    sweep_temp_files,
    truncate_log,
    with_checksum,
)

TRACKER_DIR = "metaopt"  # accelerate trackers write their event files under RUN/metaopt/
RUNNING_WINDOW = 20


def versions() -> dict[str, str]:
    import accelerate
    import higher
    import timm

    import metaopt

    return {
        "metaopt": metaopt.__version__,
        "torch": str(torch.__version__),
        "timm": timm.__version__,
        "accelerate": accelerate.__version__,
        "higher": getattr(higher, "__version__", "0.2.1"),
        "python": platform.python_version(),
    }


def build_model(config: TrainConfig) -> torch.nn.Module:
    if config.model == "auto":
        if config.regression:
            return mlp()
        return conv4(num_classes=config.ways, img_size=config.image_size, in_chans=config.channels or 1)
    if config.regression:
        if config.model in REGRESSION_MODELS:
            return create_model(config.model)
        return create_model(config.model, num_classes=1)
    kwargs: dict[str, Any] = {"num_classes": config.ways, "img_size": config.image_size}
    if config.model in OWN_IMAGE_MODELS:
        kwargs.update(in_chans=config.channels or 1)
    elif config.model != "mlp":
        kwargs.update(in_chans=config.channels or 1, pretrained_path=config.pretrained_path)
    return create_model(config.model, **kwargs)


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig) -> Any:
    """timm's scheduler for ``config.lr_schedule`` over ``config.iterations`` steps (None for "none")."""
    if config.lr_schedule == "none":
        if config.warmup_iters:
            raise ConfigError("warmup_iters needs a schedule; set lr_schedule (e.g. cosine).")
        return None
    from timm.scheduler import create_scheduler_v2

    scheduler, _ = create_scheduler_v2(
        optimizer, sched=config.lr_schedule, num_epochs=config.iterations, warmup_epochs=config.warmup_iters
    )
    return scheduler


def build_learner(config: TrainConfig, model: torch.nn.Module) -> MetaLearner:
    plugins = [create_plugin(name, **options) for name, options in plugin_specs(config.plugins)]
    return MetaLearner(
        model,
        plugins,
        inner_steps=config.inner_steps,
        inner_lr=config.inner_lr,
        eval_inner_steps=config.eval_inner_steps,
        loss_fn=F.mse_loss if config.regression else F.cross_entropy,
        first_order=config.first_order,
        inner_optimizer=config.inner_optimizer,
        bn_policy=config.bn_policy,
        backend=config.backend,
        engine=config.engine,
        task_chunk=config.task_chunk,
        memory=config.memory,
    )


def make_eval_sampler(
    config: TrainConfig,
    data: str | None = None,
    split: str = "test",
    seed: int | None = None,
    test_alphabets: list[str] | None = None,
    ways: int | None = None,
    shots: int | None = None,
    query: int | None = None,
    model: torch.nn.Module | None = None,
) -> TaskSampler:
    """The test-task sampler of a run; ``ways``/``shots``/``query`` override the run's.

    ``model``: the run's model, whose pretrained statistics normalise the images when
    ``config.normalize`` is on.
    """
    return make_sampler(
        data or config.data,
        split=split,
        ways=config.ways if ways is None else ways,
        shots=config.shots if shots is None else shots,
        query=config.query if query is None else query,
        seed=config.seed + 1_000_003 if seed is None else seed,
        image_size=config.image_size,
        test_alphabets=config.test_alphabets if test_alphabets is None else test_alphabets,
        channels=config.channels or 1,
        normalize=data_normalization(config, model),
        workers=config.workers,
        within_alphabet=config.within_alphabet,
    )


def resolve_data_settings(config: TrainConfig) -> None:
    """Fill in what ``None`` means for ``channels`` (detected from folder data) and ``normalize``."""
    from metaopt.data.files import csv_files
    from metaopt.data.images import channels_of, detect_channels
    from metaopt.data.sources import parse_spec

    if config.channels is None:
        data = parse_spec(config.data)
        if data.kind == "folder" and data.path:
            config.channels = detect_channels(data.path)
        elif data.kind == "csv":
            files, _ = csv_files(data.text, "train")
            config.channels = channels_of([path for path, _ in files[:: max(1, len(files) // 8)][:8]])
        else:
            config.channels = 1
    if config.normalize is None:
        config.normalize = config.pretrained_path is not None


def data_normalization(config: TrainConfig, model: torch.nn.Module | None) -> tuple[list[float], list[float]] | None:
    """The (mean, std) that normalise images: the model's pretrained statistics, when asked for."""
    if not config.normalize or config.regression or model is None:
        return None
    from metaopt.integrations.timm import normalization

    stats = normalization(model, config.channels or 1)
    if stats is None:
        raise ConfigError(f"normalize=True needs a timm model with a pretrained config; {config.model!r} has none.")
    return stats


def evaluate(
    learner: MetaLearner,
    sampler: TaskSampler,
    tasks: int,
    steps: int | None = None,
    batch: int = 16,
    progress: str | None = None,
) -> dict[str, Any]:
    """Mean, 95% confidence half-width (1.96 standard errors) and median of each metric over ``tasks`` tasks.

    The median is there for regression: one task whose inner loop blows up can make the mean MSE
    that task's value alone (docs/benchmarks/sinusoid_paper.md).

    ``progress``: a label for a progress bar on stderr (None: no bar).
    """
    values: dict[str, list[float]] = {}
    done = 0
    with tqdm(total=tasks, desc=progress, disable=progress is None, unit="task", leave=False) as bar:
        while done < tasks:
            n = min(batch, tasks - done)
            result = learner.evaluate(sampler.sample(n), steps=steps)
            for key, per_task in result.per_task.items():
                values.setdefault(key, []).extend(per_task)
            done += n
            bar.update(n)
    report: dict[str, Any] = {"tasks": tasks, "steps": learner.eval_inner_steps if steps is None else steps}
    for key, vals in values.items():
        t = torch.tensor(vals, dtype=torch.float64)
        std = float(t.std(unbiased=True)) if len(vals) > 1 else 0.0
        report[key] = float(t.mean())
        report[f"{key}_ci95"] = 1.96 * std / math.sqrt(len(vals))
        report[f"{key}_median"] = float(t.quantile(0.5)) if len(vals) else math.nan
    if "accuracy" in report:
        report["ci95"] = report["accuracy_ci95"]
    else:
        report["mse"] = report["query_loss"]
        report["ci95"] = report["query_loss_ci95"]
    return report


def metric_key(report: dict[str, Any]) -> str:
    """The headline metric of an evaluation report: accuracy (classification) or mse."""
    return "accuracy" if "accuracy" in report else "mse"


def median_note(report: dict[str, Any]) -> str:
    """`` (median over tasks X)`` for a regression report (one blown-up task dominates its mean), else ``""``."""
    median = report.get("query_loss_median") if metric_key(report) == "mse" else None
    return f" (median over tasks {median:.4f})" if median is not None else ""


def describe_report(report: dict[str, Any]) -> str:
    key = metric_key(report)
    return f"{key} {report[key]:.4f} ± {report['ci95']:.4f} over {report['tasks']} tasks{median_note(report)}"


def restore_learner(learner: MetaLearner, state: dict[str, Any], path: Path) -> None:
    """Load meta-parameters, plugin modules and plugin state from a checkpoint's contents."""
    try:
        learner.load_state_dict(state["learner"])
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {str(path)!r} does not fit this model/plugin set: {exc}") from exc
    learner.load_plugin_state(state["plugin_state"])


class StopOnSignals:
    """Turn SIGINT/SIGTERM into a flag checked between iterations; a second SIGINT aborts at once."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum

    def __enter__(self) -> StopOnSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Trainer:
    """Meta-train a learner from a :class:`TrainConfig` into a run directory."""

    def __init__(
        self, config: TrainConfig, run_dir: str | Path, *, resume: bool = False, overwrite: bool = False
    ) -> None:
        self.config = config
        self.run_dir = Path(run_dir)
        resolve_data_settings(config)  # before comparing with a saved config
        from metaopt.integrations.accelerate import make_accelerator

        self.accelerator = make_accelerator(
            config.precision, cpu=config.device == "cpu", log_with=config.log_with, project_dir=str(self.run_dir)
        )
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise ConfigError(f"--out {str(self.run_dir)!r} is a file, not a folder; give a folder for the run.")
        self.lock = RunLock(self.run_dir)
        self._resume_from: tuple[Path, dict[str, Any]] | None = None
        if self.is_main:  # only rank 0 locks, reads, clears and later writes the run directory
            self.lock.acquire()
            try:
                self._open_run_dir(resume, overwrite)
            except BaseException:
                self.lock.release()
                raise
        try:
            self._build(config, resume)
        except BaseException:
            self.lock.release()
            raise

    def _build(self, config: TrainConfig, resume: bool) -> None:
        from metaopt.integrations.accelerate import prepare

        self.accelerator.wait_for_everyone()
        if config.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device='cuda' but torch sees no CUDA device; use --device cpu (or auto).")
        if config.keep_freed_memory and self.accelerator.device.type == "cpu":
            keep_freed_memory()  # process-wide; this program is the CLI's (docs/engines.md)
        seed_everything(config.seed)
        self.model = build_model(config)
        self.learner = prepare(build_learner(config, self.model), self.accelerator)
        self.world, self.rank = self.accelerator.num_processes, self.accelerator.process_index
        if config.meta_batch % self.world:
            raise ConfigError(
                f"meta_batch={config.meta_batch} does not split evenly over {self.world} processes; "
                f"use a multiple of {self.world}."
            )
        if self.world > 1 and config.on_nonfinite == "skip":
            raise ConfigError("on_nonfinite='skip' is single-process only; use 'raise' with several processes.")
        named = [(n, p) for n, p in self.learner.named_parameters() if p.requires_grad]
        groups = param_groups(named, config.param_group_lr) if config.param_group_lr else [p for _, p in named]
        self.optimizer = make_outer_optimizer(
            config.outer_optimizer, groups, config.meta_lr, **config.outer_optimizer_kwargs
        )
        self.scheduler = make_scheduler(self.optimizer, config)
        self.sampler = make_sampler(
            config.data,
            split="train",
            ways=config.ways,
            shots=config.shots,
            query=config.query,
            seed=config.seed,
            image_size=config.image_size,
            rotations=config.rotations,
            test_alphabets=config.test_alphabets,
            channels=config.channels or 1,
            normalize=data_normalization(config, self.model),
            augment=config.augment,
            workers=config.workers,
            within_alphabet=config.within_alphabet,
        )
        # built once (a periodic eval used to re-read the data every time); with periodic
        # evaluation on, building it here checks before step 1 that the test split can make tasks
        # (without it an empty test split is fine: e.g. test_alphabets: [] trains on every alphabet)
        self.eval_sampler: TaskSampler | None = None
        try:
            self.eval_sampler = make_eval_sampler(config, split="test", model=self.model)
        except (ConfigError, DataError) as exc:
            if config.eval_every:
                raise type(exc)(f"the test split cannot make evaluation tasks: {exc}") from exc
        self._eval_start = None if self.eval_sampler is None else self.eval_sampler.state_dict()
        self.data_record = data_record(
            config.data, {"train": split_record(self.sampler), "test": split_record(self.eval_sampler)}
        )
        if resume and self.data_record is not None:
            saved = read_record(self.run_dir / DATA_FILE)
            for split in ("train", "test"):
                check_unchanged(saved, split, self.data_record["splits"][split], "resuming")
        if self.data_record is not None:  # a split file (csv:) may list training classes in test.csv too
            warn_if_trained_on(self.data_record, self.data_record["splits"]["test"], "the test split")
        self.best_eval: dict[str, Any] | None = None
        self.recent: collections.deque[dict[str, float]] = collections.deque(maxlen=RUNNING_WINDOW)
        self.iteration = 0
        self.skipped = 0
        self.elapsed = 0.0  # training seconds before this process (a resumed run continues the clock)
        self._started: float | None = None
        self.last_checkpoint: Path | None = None
        if resume:
            self.load(*(self._resume_from or newest_intact(self.run_dir)))
            self._resume_from = None
        self.resumed = resume

    def close(self) -> None:
        """Release the run folder's lock (``train`` does, when it ends)."""
        self.lock.release()

    # -- run directory --------------------------------------------------------------
    def _open_run_dir(self, resume: bool, overwrite: bool) -> None:
        swept = sweep_temp_files(self.run_dir)
        if swept:
            warnings.warn(
                f"removed {len(swept)} temp file(s) of interrupted writes: {swept[:3]}", RunDirWarning, stacklevel=2
            )
        if resume:
            if checkpoint_files(self.run_dir):
                self._resume_from = newest_intact(self.run_dir)
            saved = run_settings(self.run_dir, None if self._resume_from is None else self._resume_from[1])
            current = self.config.to_dict()  # coerced, so "1e-2" equals 0.01
            refused = config_differences(saved, current, ignore=RESUME_SAFE_KEYS)
            if refused:
                raise ConfigError(
                    f"cannot resume {str(self.run_dir)!r} with different settings ({'; '.join(refused)}). A resumed "
                    f"run may change only {', '.join(RESUME_SAFE_KEYS)}; start a new run (another --out) instead."
                )
            return
        if is_run(self.run_dir) and not overwrite:
            raise ConfigError(
                f"{str(self.run_dir)!r} already holds a run (a config, checkpoints or a log); pass --resume to continue "
                "it or --overwrite to replace it."
            )
        if overwrite:
            for old in checkpoint_files(self.run_dir):
                old.unlink()
            for name in (METRICS_FILE, BEST_FILE, CONFIG_FILE, DATA_FILE):
                (self.run_dir / name).unlink(missing_ok=True)
            shutil.rmtree(self.run_dir / TRACKER_DIR, ignore_errors=True)  # old TensorBoard/W&B event files

    @property
    def is_main(self) -> bool:
        return bool(self.accelerator.is_main_process)

    # -- checkpoints ----------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "iteration": self.iteration,
            "skipped": self.skipped,
            "learner": self.learner.state_dict(),
            "plugin_state": self.learner.plugin_state(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "sampler": self.sampler.state_dict(),
            "rng": rng_state(),
            "elapsed": self._clock(),
            "best_eval": self.best_eval,  # a resumed run's --keep-best compares against it, not afresh
            "config": self.config.to_dict(),
            "versions": versions(),
        }

    def save(self) -> Path | None:
        if not self.is_main:
            return None
        path = self._write(self.run_dir / CHECKPOINT_DIR / f"ckpt-{self.iteration:08d}.pt")
        for old in checkpoint_files(self.run_dir)[: -self.config.keep_checkpoints]:
            old.unlink()
        self.last_checkpoint = path
        return path

    def _write(self, path: Path) -> Path:
        """The state, checksummed, written atomically; a failed write names the file and keeps the last one."""
        try:
            return save_atomic(with_checksum(self.state()), path)
        except (OSError, RuntimeError) as exc:
            kept = f"; the previous checkpoint {str(self.last_checkpoint)!r} is kept" if self.last_checkpoint else ""
            raise CheckpointError(f"{disk_error(exc, path, 'write a checkpoint')}{kept}") from exc

    def load(self, path: Path, state: dict[str, Any] | None = None) -> None:
        """Continue from checkpoint ``path`` (``state``: its contents, already read and verified)."""
        state = load_verified(path) if state is None else state
        restore_learner(self.learner, state, path)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            # same length: the saved state; a resume that changed `iterations` keeps the schedule
            # built for the new length (timm's schedules are functions of the step)
            if state.get("scheduler") is not None and state["config"]["iterations"] == self.config.iterations:
                self.scheduler.load_state_dict(state["scheduler"])
            self.scheduler.step(int(state["iteration"]))
        self.sampler.load_state_dict(state["sampler"])
        set_rng_state(state["rng"])
        self.iteration = int(state["iteration"])
        self.skipped = int(state.get("skipped", 0))
        self.elapsed = float(state.get("elapsed", 0.0))
        self.learner.iteration = self.iteration
        self.best_eval = state.get("best_eval") or best_logged_eval(self.run_dir, self.iteration, self.config)
        self.last_checkpoint = path
        if self.is_main:  # log lines after the checkpoint will be redone; unreadable ones are named
            dropped = truncate_log(self.run_dir / METRICS_FILE, self.iteration)
            if dropped:
                warnings.warn(
                    f"dropped {len(dropped)} unreadable line(s) of {str(self.run_dir / METRICS_FILE)!r}: "
                    + "; ".join(dropped[:5]),
                    RunDirWarning,
                    stacklevel=2,
                )

    def _clock(self) -> float:
        """Training seconds so far, across resumes."""
        return self.elapsed + (0.0 if self._started is None else time.perf_counter() - self._started)

    # -- the loop -------------------------------------------------------------------
    def _log(self, record: dict[str, Any]) -> None:
        if self.is_main:
            try:
                with open(self.run_dir / METRICS_FILE, "a") as fh:
                    fh.write(json.dumps(record) + "\n")
            except OSError as exc:
                raise disk_error(exc, self.run_dir / METRICS_FILE, "append to the log") from exc
        if self.config.log_with:  # accelerate's trackers (TensorBoard, W&B, ...); numbers only
            flat = {k: v for k, v in record.items() if isinstance(v, int | float) and k != "iteration"}
            for key, value in (record.get("eval") or {}).items():
                if isinstance(value, int | float):
                    flat[f"eval/{key}"] = value
            self.accelerator.log(flat, step=record["iteration"])

    def train(self, progress: bool = True) -> dict[str, Any]:
        """Train to ``config.iterations``; the run folder stays locked until it returns or raises."""
        try:
            return self._train(progress)
        finally:
            self.close()

    def _train(self, progress: bool) -> dict[str, Any]:
        config = self.config
        if self.resumed and self.iteration >= config.iterations:
            raise ConfigError(
                f"the run in {str(self.run_dir)!r} is already at iteration {self.iteration}, and iterations="
                f"{config.iterations}: nothing to train. Pass --iterations N with N > {self.iteration} to continue."
            )
        if self.is_main:
            check_writable(self.run_dir)
            record = {**config.to_dict(), "engine_chosen": self.engine_chosen}
            try:
                (self.run_dir / CONFIG_FILE).write_text(json.dumps(record, indent=2))
            except OSError as exc:
                raise disk_error(exc, self.run_dir / CONFIG_FILE, "write the run config") from exc
            if self.data_record is not None and not (self.run_dir / DATA_FILE).is_file():
                try:
                    (self.run_dir / DATA_FILE).write_text(json.dumps(self.data_record, indent=1))
                except OSError as exc:
                    raise disk_error(exc, self.run_dir / DATA_FILE, "write the run's data record") from exc
        metrics: dict[str, Any] = {}
        if config.log_with:
            hparams = {k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in config.to_dict().items()}
            self.accelerator.init_trackers(TRACKER_DIR, config=hparams)
        bar = tqdm(
            total=config.iterations, initial=self.iteration, disable=not (progress and self.is_main), desc="meta-train"
        )
        self._started = time.perf_counter()
        with StopOnSignals() as stop:
            while self.iteration < config.iterations:
                if stop.signal is not None:
                    self._stop(stop.signal)
                step_metrics = self._step()
                record = {"iteration": self.iteration, "time": round(self._clock(), 3), **step_metrics}
                if self.learner.last_engine is not None:
                    record["engine"] = self.learner.last_engine
                record.update(self.compile_report())
                self._log(record)
                if "skipped" not in step_metrics:
                    self.recent.append({k: v for k, v in step_metrics.items() if isinstance(v, int | float)})
                    metrics = self.running_means()
                    bar.set_postfix({k: f"{v:.3f}" for k, v in metrics.items() if k in ("meta_loss", "accuracy")})
                bar.update(1)
                if config.eval_every and self.iteration % config.eval_every == 0:
                    report = self.periodic_eval()
                    self._log({"iteration": self.iteration, "eval": report})
                    if self.is_main:
                        bar.write(f"eval @ {self.iteration}: {describe_report(report)}")
                if config.checkpoint_every and self.iteration % config.checkpoint_every == 0:
                    self.save()
            bar.close()
            self.save()
        if config.log_with:
            self.accelerator.end_training()
        return metrics

    def running_means(self) -> dict[str, float]:
        """Each metric's mean over the last ``RUNNING_WINDOW`` iterations (one batch alone is noisy)."""
        keys = {k for m in self.recent for k in m}
        return {k: sum(m[k] for m in self.recent if k in m) / sum(k in m for m in self.recent) for k in sorted(keys)}

    def periodic_eval(self) -> dict[str, Any]:
        """Evaluate on the same test tasks every time; keep the best report."""
        assert self.eval_sampler is not None and self._eval_start is not None  # eval_every > 0: built at start
        self.eval_sampler.load_state_dict(self._eval_start)
        report = evaluate(self.learner, self.eval_sampler, self.config.eval_tasks)
        key = self.config.keep_best or metric_key(report)
        if key not in report:
            raise ConfigError(f"keep_best={key!r} is not an evaluation metric here; the report has {sorted(report)}.")
        if improves(report, self.best_eval, key):
            self.best_eval = {**report, "iteration": self.iteration}
            if self.config.keep_best and self.is_main:
                self._write(self.run_dir / BEST_FILE)
        return report

    @property
    def engine_chosen(self) -> str:
        """The engine that runs this run's batches (``auto`` resolved; see docs/engines.md)."""
        from metaopt.engines import auto_engine

        return self.learner.engine if self.learner.engine != "auto" else auto_engine(self.learner.engine_context)

    def compile_report(self) -> dict[str, Any]:
        """engine="compile": first-call time (compilation and the exactness gate), graphs, recompilations,
        and the gate's distances from float64 (empty for the other engines)."""
        engine = self.learner.engines.get("compile")
        if engine is None:
            return {}
        report = {"compile_s": round(engine.compile_seconds, 3), "graphs": engine.compiles}
        report["recompiles"] = engine.recompiles
        report["meta_gradient_in_graph"] = bool(engine.fused)  # docs/engines.md: one graph, or through autograd
        # tasks per compiled call: one for a model with convolutions, else the meta-batch (or task_chunk)
        batch = self.config.meta_batch
        report["tasks_per_call"] = min(engine.chunk_size(self.learner.engine_context, batch), batch)
        if engine.gate is not None:
            keys = ("d_compiled", "d_eager", "tolerance", "float64_moves", "judged_at", "float64_compiled")
            report["gate"] = {k: engine.gate[k] for k in keys if k in engine.gate}
        return report

    def summary(self) -> str:
        """One line for the end of training: engine, running means, best periodic eval, wall time."""
        how = " (chosen by --engine auto)" if self.config.engine == "auto" else ""
        parts = [
            f"trained {self.iteration} iterations in {self._clock():.1f} s on the {self.engine_chosen} engine{how}"
        ]
        compiled = self.compile_report()
        if compiled:
            gate = compiled.get("gate")
            trusted = ""
            if gate and "float64_compiled" in gate:
                trusted = (
                    f", trusted by its exactness gate in float64 (the meta-gradient is rough at rounding level: "
                    f"float64 moves {gate['float64_moves']:.2g}; the compiled code in float64 is "
                    f"{gate['float64_compiled']:.2g} from eager float64, its float32 meta-gradient "
                    f"{gate['d_compiled']:.2g} from the nearest float64 one)"
                )
            elif gate:
                trusted = (
                    f", trusted by its exactness gate (meta-gradient {gate['d_compiled']:.2g} from float64, eager "
                    f"{gate['d_eager']:.2g}, bound {gate['tolerance']:.2g}, at {gate['judged_at']}; float64 moves "
                    f"{gate['float64_moves']:.2g} under rounding there)"
                )
            parts.append(
                f"compiled {compiled['graphs']} graph(s) in {compiled['compile_s']:.1f} s of first calls "
                f"(meta-gradient {'inside the graph' if compiled['meta_gradient_in_graph'] else 'through autograd'}, "
                f"{compiled['tasks_per_call']} task(s) per call), "
                f"{compiled['recompiles']} recompilation(s){trusted}"
            )
        if self.recent:
            means = ", ".join(f"{k}={v:.4f}" for k, v in self.running_means().items())
            parts.append(f"mean of the last {len(self.recent)}: {means}")
        if self.best_eval is not None:
            parts.append(f"best eval @ {self.best_eval['iteration']}: {describe_report(self.best_eval)}")
        return "; ".join(parts)

    def _step(self) -> dict[str, Any]:
        """One meta-iteration: gradient, optional clipping, optimizer step (or a counted skip)."""
        config = self.config
        self.learner.train()
        self.optimizer.zero_grad(set_to_none=True)
        # every process draws the same whole batch (samplers stay in step) and adapts its share
        tasks = self.sampler.sample(config.meta_batch)[self.rank :: self.world]
        try:
            result = self.learner.backward(tasks)
        except NumericalError as exc:
            if config.on_nonfinite == "skip" and all_finite(list(self.learner.meta_parameters())):
                self.optimizer.zero_grad(set_to_none=True)
                self.skipped += 1
                self.iteration += 1
                self.learner.iteration = self.iteration
                return {"skipped": str(exc), "skipped_total": self.skipped}
            where = str(self.last_checkpoint) if self.last_checkpoint else "none written yet"
            raise NumericalError(
                f"{exc} Last good checkpoint: {where}.", iteration=exc.iteration, hook=exc.hook, task=exc.task
            ) from exc
        metrics = self._mean_over_processes(result.metrics)
        if config.clip_grad_norm is not None:
            params = list(self.learner.meta_parameters())
            norm = self.accelerator.clip_grad_norm_(params, config.clip_grad_norm)
            metrics["grad_norm"] = float(norm)
        self.optimizer.step()
        self.iteration += 1
        if self.scheduler is not None:
            self.scheduler.step(self.iteration)
            metrics["lr"] = float(self.optimizer.param_groups[0]["lr"])
        return metrics

    def _mean_over_processes(self, metrics: dict[str, float]) -> dict[str, float]:
        if self.world == 1:
            return dict(metrics)
        keys = sorted(metrics)
        values = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=self.accelerator.device)
        reduced = self.accelerator.reduce(values, reduction="mean")
        return {k: float(v) for k, v in zip(keys, reduced.tolist())}

    def _stop(self, signum: int) -> None:
        path = self.save()
        name = signal.Signals(signum).name
        raise TrainingInterrupted(
            f"stopped by {name} after iteration {self.iteration}; checkpoint written to {path}. "
            f"Continue with: metaopt train --out {self.run_dir} --resume",
            signal_number=signum,
        )


#: keys of config.json that record what the run resolved, not settings (left out when read back)
DERIVED_KEYS = ("engine_chosen",)


def read_run_config(path: Path) -> dict[str, Any]:
    """A run's ``config.json`` as settings (the keys in :data:`DERIVED_KEYS` left out)."""
    return {k: v for k, v in read_json_object(path).items() if k not in DERIVED_KEYS}


def _plain(values: dict[str, Any]) -> dict[str, Any]:
    """As JSON holds it (tuples as lists), so a checkpoint's config compares with config.json."""
    return json.loads(json.dumps(values))


def run_settings(run_dir: Path, state: dict[str, Any] | None = None) -> dict[str, Any]:
    """A run's settings: ``config.json``, checked against the config stored in the newest intact
    checkpoint (the truth); rebuilt from that checkpoint when ``config.json`` is missing."""
    cfg_path = run_dir / CONFIG_FILE
    if state is None and checkpoint_files(run_dir):
        state = newest_intact(run_dir)[1]
    stored = None if state is None else _plain({k: v for k, v in state["config"].items() if k not in DERIVED_KEYS})
    if not cfg_path.is_file():
        if stored is None:
            raise ConfigError(
                f"{str(run_dir)!r} is not a run directory (no {CONFIG_FILE} and no checkpoint); pass the --out of a "
                "train run."
            )
        warnings.warn(
            f"{str(cfg_path)!r} is missing; using the config stored in the newest checkpoint.",
            RunDirWarning,
            stacklevel=2,
        )
        with contextlib.suppress(OSError):  # a read-only run still evaluates: the settings come from the checkpoint
            cfg_path.write_text(json.dumps(stored, indent=2))
        return stored
    saved = _plain(read_run_config(cfg_path))
    if stored is not None:
        differ = config_differences(stored, saved, ignore=RESUME_SAFE_KEYS)
        if differ:
            raise ConfigError(
                f"{str(cfg_path)!r} disagrees with the config stored in the run's checkpoints ({'; '.join(differ)}; "
                f"checkpoint -> {CONFIG_FILE}). The checkpoint's is the run's truth: restore those values in "
                f"{CONFIG_FILE} (or delete it to have it rebuilt), and start a new run to change them."
            )
    return saved


def improves(report: dict[str, Any], best: dict[str, Any] | None, key: str) -> bool:
    """Whether evaluation ``report`` replaces ``best`` by ``key``: higher accuracy, lower loss (a tie replaces)."""
    return best is None or (report[key] > best[key]) == (key == "accuracy")


def best_logged_eval(run_dir: Path, iteration: int, config: TrainConfig) -> dict[str, Any] | None:
    """The best periodic evaluation logged up to ``iteration`` (checkpoints written before ``best_eval`` was
    saved in them): without it, the first evaluation after a resume replaced best.pt however bad it was."""
    best = None
    path = run_dir / METRICS_FILE
    lines = path.read_text().splitlines() if path.is_file() else []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        report = record.get("eval") if isinstance(record, dict) else None
        if not isinstance(report, dict) or record.get("iteration", iteration + 1) > iteration:
            continue
        key = config.keep_best or metric_key(report)
        if key in report and improves(report, best, key):
            best = {**report, "iteration": record["iteration"]}
    return best


def load_run(run_dir: str | Path, checkpoint: str = "latest") -> tuple[TrainConfig, MetaLearner]:
    """Rebuild the learner of a run from its config and a checkpoint (see :func:`checkpoint_path`)."""
    config, learner, _ = load_checkpoint(run_dir, checkpoint_path(run_dir, checkpoint))
    return config, learner


def checkpoint_path(run_dir: str | Path, checkpoint: str) -> Path | None:
    """``"latest"`` (None: the newest intact one), ``"best"`` (``RUN/best.pt``) or a checkpoint file of the run."""
    if checkpoint == "latest":
        return None
    if checkpoint == "best":
        best = Path(run_dir) / BEST_FILE
        if not best.is_file():
            raise CheckpointError(
                f"run {str(run_dir)!r} has no {BEST_FILE}: it is kept by training with --keep-best METRIC and "
                "--eval-every N. Use --checkpoint latest, or a file under checkpoints/."
            )
        return best
    path = Path(checkpoint)
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {checkpoint!r} is not a file; give latest, best, or a file such as "
            f"{str(Path(run_dir) / CHECKPOINT_DIR / 'ckpt-00000100.pt')!r}."
        )
    return path


def load_checkpoint(
    run_dir: str | Path, path: str | Path | None = None
) -> tuple[TrainConfig, MetaLearner, dict[str, Any]]:
    """A run's config, its learner at checkpoint ``path`` (default: the latest), and the checkpoint.

    The checkpoint is verified (a corrupt or foreign file is a ``CheckpointError`` naming it) and
    ``config.json`` must agree with the config stored in it.  Works on a run being trained: a
    checkpoint removed by the trainer between listing and reading is replaced by the newer one.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"{str(run_dir)!r} is not a run directory (no such folder); pass the --out of a train run.")
    for _ in range(5):
        if path is None:
            found = checkpoint_files(run_dir)
            if not found:
                if (run_dir / CONFIG_FILE).is_file():
                    raise CheckpointError(f"run {str(run_dir)!r} has no checkpoint yet.")
                raise ConfigError(f"{str(run_dir)!r} is not a run directory (no {CONFIG_FILE}, no checkpoint).")
            chosen = found[-1]
        else:
            chosen = Path(path)
        try:
            state = load_verified(chosen)
            break
        except CheckpointError:
            if path is not None or chosen.exists():
                raise
    else:  # pragma: no cover - five checkpoints removed under us in a row
        raise CheckpointError(f"the checkpoints of {str(run_dir)!r} kept changing while being read; try again.")
    settings = run_settings(run_dir, state)
    config = TrainConfig.from_dict(settings, source=str(run_dir / CONFIG_FILE))
    seed_everything(config.seed)
    learner = build_learner(config, build_model(config))
    restore_learner(learner, state, chosen)
    return config, learner, state
