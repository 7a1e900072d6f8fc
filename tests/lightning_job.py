"""Lightning meta-training used by the integration tests (also as a 2-process torchrun job).

``python -m torch.distributed.run --nproc_per_node 2 lightning_job.py OUT``: every rank trains
3 meta-steps under strategy="ddp" on its share of each 4-task batch (Lightning's distributed
sampler) and saves its final parameters; one process with the whole batches is the reference.
"""

from __future__ import annotations

import os
import sys

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from conftest import class_tasks
from torch import nn
from torch.utils.data import DataLoader

from metaopt import HeadedModel
from metaopt.integrations.lightning import MetaLightningModule

STEPS = 3


class MetaClassifier(MetaLightningModule):
    def __init__(self, plugins=("shot", ("sharp_maml", {"rho_inner": 0.05, "rho_outer": 0.05})), lr=1e-2):
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        self.model = HeadedModel(nn.Sequential(nn.Linear(4, 8), nn.Tanh()), nn.Linear(8, 3))
        from metaopt import create_plugin

        made = [create_plugin(p) if isinstance(p, str) else create_plugin(p[0], **p[1]) for p in plugins]
        self.configure_meta(self.model, made, inner_steps=2, inner_lr=0.3, loss_fn=F.cross_entropy)

    def training_step(self, batch, batch_idx):
        return self.meta_step(batch)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def tasks(n: int = 4 * STEPS, dtype=torch.float64):
    return class_tasks(n, dtype)


def loader(batch_size: int, dtype=torch.float64, rank: int = 0, world: int = 1) -> DataLoader:
    """Rank ``rank`` of ``world`` gets tasks rank, rank+world, ...: per step, the ranks' batches
    together are the single process's batch (Lightning's own distributed sampler shuffles)."""
    return DataLoader(tasks(dtype=dtype)[rank::world], batch_size=batch_size, shuffle=False, collate_fn=list)


def fit(
    module: MetaLightningModule, devices: int = 1, steps: int = STEPS, dtype=torch.float64, **trainer_kwargs
) -> pl.Trainer:
    kwargs = dict(accelerator="cpu", devices=devices, max_steps=steps, precision="64-true", logger=False)
    kwargs.update(enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer = pl.Trainer(**{**kwargs, **trainer_kwargs}, use_distributed_sampler=False)
    rank = int(os.environ.get("RANK", 0)) if devices > 1 else 0
    trainer.fit(module, loader(4 // devices, dtype, rank, devices))
    return trainer


if __name__ == "__main__":
    module = MetaClassifier()
    trainer = fit(module, devices=2, strategy="ddp")
    state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    torch.save(state, f"{sys.argv[1]}/rank{trainer.global_rank}.pt")
