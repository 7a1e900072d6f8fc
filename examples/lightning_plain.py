"""BEFORE: an ordinary LightningModule training script (synthetic glyphs, CPU, seconds).

python examples/lightning_plain.py --steps 30
"""

import argparse

import lightning.pytorch as pl
import timm
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from metaopt.data.glyphs import GlyphTasks


class Classifier(pl.LightningModule):
    def __init__(self, lr: float = 1e-3):
        super().__init__()
        self.save_hyperparameters()
        self.model = timm.create_model("test_resnet", num_classes=5, in_chans=1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.model(x), y)
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
loader = DataLoader(TensorDataset(images, labels), batch_size=25, shuffle=True)

trainer = pl.Trainer(max_steps=args.steps, accelerator="cpu", logger=False, enable_checkpointing=False)
trainer.fit(Classifier(), loader)
print(f"step {trainer.global_step}: loss {float(trainer.callback_metrics['loss']):.4f}")
