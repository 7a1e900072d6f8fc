"""Hugging Face Trainer meta-training used by the integration tests (also as a 2-process torchrun job).

``python -m torch.distributed.run --nproc_per_node 2 hf_trainer_job.py OUT``: every rank runs
``MetaTrainer`` for 3 meta-steps on its share of each 4-task batch (accelerate shards the loader:
batches of 2 tasks, rank r takes every second one), evaluates on its share of 11 test tasks (accelerate pads the uneven split), and
saves its final parameters and the evaluation; one process with batches of 4 is the reference.
"""

from __future__ import annotations

import json
import sys

import torch
import transformers
from torch.utils.data import SequentialSampler

from metaopt import MetaLearner, create_plugin
from metaopt.integrations.transformers import LogitsOf, MetaTrainer

STEPS = 3


def vit() -> torch.nn.Module:
    """A tiny float64 ViT built from a config (no download; eager attention has a double backward)."""
    torch.manual_seed(0)
    config = transformers.ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=1,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        num_labels=3,
        attn_implementation="eager",
    )
    return LogitsOf(transformers.ViTForImageClassification(config)).double()


def tasks(n: int, seed: int = 0) -> list[tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(6, 1, 8, 8, generator=g, dtype=torch.float64),
            torch.arange(3).repeat(2),
            torch.randn(9, 1, 8, 8, generator=g, dtype=torch.float64),
            torch.arange(3).repeat(3),
        )
        for _ in range(n)
    ]


class InOrder(MetaTrainer):
    """Tasks in order (the Trainer shuffles by default), so one process can replay what two saw."""

    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)


def run(out: str, per_device: int) -> tuple[MetaTrainer, dict[str, float]]:
    plugins = [create_plugin("shot"), create_plugin("sharp_maml", rho_inner=0.05, rho_outer=0.05)]
    learner = MetaLearner(vit(), plugins, inner_steps=2, inner_lr=0.1)
    args = transformers.TrainingArguments(
        output_dir=out,
        per_device_train_batch_size=per_device,
        per_device_eval_batch_size=3,
        max_steps=STEPS,
        learning_rate=1e-2,
        max_grad_norm=0.0,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )
    # 11 evaluation tasks in batches of 3: two processes get 6 each, the last one repeated as padding
    trainer = InOrder(learner=learner, args=args, train_dataset=tasks(4 * STEPS), eval_dataset=tasks(11, seed=1))
    trainer.train()
    return trainer, trainer.evaluate()


if __name__ == "__main__":
    trainer, metrics = run(sys.argv[1] + "/hf", per_device=2)
    rank = trainer.args.process_index
    torch.save({k: v.detach().clone() for k, v in trainer.learner.state_dict().items()}, f"{sys.argv[1]}/rank{rank}.pt")
    with open(f"{sys.argv[1]}/eval{rank}.json", "w") as fh:
        json.dump(metrics, fh)
