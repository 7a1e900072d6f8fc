"""Hugging Face ``Trainer``: meta-learning with metaopt plugins (``pip install transformers``; from a checkout ``pip install '.[transformers]'``).

``MetaTrainer(learner=MetaLearner(model, plugins, ...), args=TrainingArguments(...),
train_dataset=episodes, eval_dataset=test_episodes)`` is a ``transformers.Trainer`` whose
training step is one meta-iteration (``learner.backward`` fills ``.grad``; the Trainer's optimizer,
scheduler, clipping, logging and checkpointing stay as they are) and whose ``evaluate`` adapts to
each test task.  The datasets yield tasks (an :class:`~metaopt.data.EpisodeDataset`, a list of
``(support_x, support_y, query_x, query_y)``).  ``save_model`` and checkpoints hold the learner's
state dict, plugin modules included; plugin state (warm-up counters) goes beside them in
``metaopt_plugin_state.pt`` and is restored by ``train(resume_from_checkpoint=...)``.
A ``transformers`` model returns an output object: wrap it with :class:`LogitsOf`.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from metaopt.checkpoint import load_safe, save_atomic
from metaopt.data.dataset import collate_tasks
from metaopt.errors import ConfigError
from metaopt.integrations.accelerate import prepare, refuse_accumulation_with_outer_step
from metaopt.learner import MetaLearner
from metaopt.task import TaskData

try:
    import transformers

    TRANSFORMERS_AVAILABLE = True
except ImportError:  # pragma: no cover - the extra is optional
    TRANSFORMERS_AVAILABLE = False
    transformers = None  # type: ignore[assignment]

PLUGIN_STATE_FILE = "metaopt_plugin_state.pt"


class LogitsOf(nn.Module):
    """``model(x).logits`` for a ``transformers`` model (``pixel_values`` or ``input_ids`` input)."""

    def __init__(self, model: nn.Module, input_name: str = "pixel_values") -> None:
        super().__init__()
        self.model, self.input_name = model, input_name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(**{self.input_name: x}).logits


def collate_meta_batch(tasks: list[Any]) -> dict[str, list[tuple[torch.Tensor, ...]]]:
    """A meta-batch as the Trainer passes inputs: ``{"tasks": [(sx, sy, qx, qy), ...]}``.

    Runs :func:`~metaopt.data.collate_tasks`, as the plain-loop path does: ``uint8`` images (an
    :class:`~metaopt.data.EpisodeDataset` of decoded images) become float32 in [0, 1]; any other
    dtype passes unchanged.  The default ``data_collator`` of :class:`MetaTrainer`.
    """
    return {"tasks": [tuple(task) for task in collate_tasks([TaskData(*task) for task in tasks])]}


_Base: Any = transformers.Trainer if TRANSFORMERS_AVAILABLE else object


class MetaTrainer(_Base):
    """A ``transformers.Trainer`` that meta-trains ``learner`` (see the module docstring)."""

    def __init__(self, *args: Any, learner: MetaLearner, **kwargs: Any) -> None:
        if not TRANSFORMERS_AVAILABLE:
            raise ConfigError(
                "transformers is not installed; pip install transformers (or, from a metaopt checkout, pip install '.[transformers]')."
            )
        if "model" in kwargs or args:
            raise ConfigError("pass the model inside learner=MetaLearner(model, ...), not as model= or positionally.")
        if kwargs.get("data_collator") is None:  # also when passed as None: the Trainer's default skips collate_tasks
            kwargs["data_collator"] = collate_meta_batch
        if kwargs.get("train_dataset") is not None and kwargs.get("eval_dataset") is not None:
            from metaopt.data.splits import warn_if_not_held_out

            warn_if_not_held_out(kwargs["train_dataset"], kwargs["eval_dataset"], "MetaTrainer")
        training_args = kwargs.get("args")
        if training_args is not None and getattr(training_args, "fp16", False):
            raise ConfigError(
                "TrainingArguments(fp16=True) is not supported by metaopt: the inner loop's autograd.grad is not "
                "loss-scaled (it underflows), and the Trainer's scaler would unscale gradients that were never "
                "scaled. Use bf16=True."
            )
        if training_args is not None:  # the Trainer accumulates itself (its accelerator is told 1 step)
            refuse_accumulation_with_outer_step(learner, training_args.gradient_accumulation_steps)
        super().__init__(model=learner, **kwargs)
        self.learner = learner
        # the Trainer's accelerator runs the learner's forwards under its autocast (bf16=True used to be ignored:
        # float32 throughout) and its backward; with several processes it averages the meta-gradient (one
        # all-reduce; DDP's wrapper never reduces: learner.backward does not go through its forward)
        prepare(learner, self.accelerator)

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        """One meta-iteration: ``.grad`` += meta-gradient / gradient_accumulation_steps."""
        model.train()
        tasks = [TaskData(*task) for task in inputs["tasks"]]
        params = list(self.learner.meta_parameters())
        before = [None if p.grad is None else p.grad.clone() for p in params]
        result = self.learner.backward(tasks)
        steps = self.args.gradient_accumulation_steps
        if steps > 1:  # the Trainer sums micro-batches' gradients: each contributes its share
            for p, old in zip(params, before, strict=True):
                if p.grad is not None:
                    new = p.grad if old is None else p.grad - old
                    p.grad = new / steps if old is None else old + new / steps
        return result.loss.detach() / steps

    def evaluate(
        self, eval_dataset: Any = None, ignore_keys: Any = None, metric_key_prefix: str = "eval"
    ) -> dict[str, float]:
        """Adapt to every task of the evaluation set; mean query loss and accuracy."""
        loader = self.get_eval_dataloader(eval_dataset)  # with several processes, this process's share
        keys: list[str] | None = None
        sums: torch.Tensor | None = None
        count = 0
        for inputs in loader:
            tasks = [TaskData(*(t.to(self.args.device) for t in task)) for task in inputs["tasks"]]
            result = self.learner.evaluate(tasks)
            if keys is None:
                keys = [k for k in ("query_loss", "accuracy") if k in result.per_task]
            rows = torch.tensor([result.per_task[k] for k in keys], dtype=torch.float64).T.to(self.args.device)
            # every process's tasks, each once: accelerate pads the last batches of an uneven evaluation set with
            # repeated tasks, which gather_for_metrics drops (the metric used to be each process's own share)
            rows = self.accelerator.gather_for_metrics(rows).cpu()
            sums = rows.sum(0) if sums is None else sums + rows.sum(0)
            count += rows.shape[0]
        if sums is None or keys is None or count == 0:
            raise ConfigError("the evaluation set yielded no tasks.")
        metrics = {f"{metric_key_prefix}_{k}": float(sums[i] / count) for i, k in enumerate(keys)}
        self.log(dict(metrics))  # (log adds the epoch to the dict it gets)
        return metrics

    def _save(self, output_dir: str | None = None, state_dict: Any = None) -> None:
        super()._save(output_dir, state_dict)
        folder = output_dir if output_dir is not None else self.args.output_dir
        save_atomic(self.learner.plugin_state(), os.path.join(folder, PLUGIN_STATE_FILE))

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any) -> Any:
        path = resume_from_checkpoint
        if path is True:
            path = transformers.trainer_utils.get_last_checkpoint(self.args.output_dir)
        if isinstance(path, str) and os.path.isfile(os.path.join(path, PLUGIN_STATE_FILE)):
            self.learner.load_plugin_state(load_safe(os.path.join(path, PLUGIN_STATE_FILE)))
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
