"""AFTER: the same LightningModule meta-learning with metaopt (diff it against lightning_plain.py).

python examples/lightning_meta.py --steps 30
"""

import argparse

import lightning.pytorch as pl
import timm
import torch
from torch.utils.data import DataLoader, TensorDataset

from metaopt.data import EpisodeDataset, collate_tasks
from metaopt.data.glyphs import GlyphTasks
from metaopt.integrations.lightning import MetaLightningModule


class Classifier(MetaLightningModule):
    def __init__(self, lr: float = 1e-3):
        super().__init__()
        self.save_hyperparameters()
        self.model = timm.create_model("test_resnet", num_classes=5, in_chans=1)
        self.configure_meta(self.model, ["shot"], inner_steps=1, inner_lr=0.1)

    def training_step(self, batch, batch_idx):
        loss = self.meta_step(batch)  # a meta-batch of tasks: inner loops, meta-gradient, optimizer step
        self.log("loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=30)
args = parser.parse_args()
torch.manual_seed(0)

glyphs = GlyphTasks(seed=0)
images = torch.cat([glyphs.draw(c, 40) for c in range(5)])
labels = torch.arange(5).repeat_interleave(40)
episodes = EpisodeDataset(TensorDataset(images, labels), ways=5, shots=1, query=5, labels=labels.tolist())
loader = DataLoader(episodes, batch_size=4, collate_fn=collate_tasks)

trainer = pl.Trainer(max_steps=args.steps, accelerator="cpu", logger=False, enable_checkpointing=False)
trainer.fit(Classifier(), loader)
print(f"step {trainer.global_step}: loss {float(trainer.callback_metrics['loss']):.4f}")
