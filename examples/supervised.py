"""BEFORE: an ordinary supervised PyTorch + timm training script (synthetic glyphs, CPU, seconds).

python examples/supervised.py --steps 30
"""

import argparse

import timm
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from metaopt.data.glyphs import GlyphTasks

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=30)
args = parser.parse_args()
torch.manual_seed(0)

glyphs = GlyphTasks(seed=0)
images = torch.cat([glyphs.draw(c, 40) for c in range(5)])
labels = torch.arange(5).repeat_interleave(40)
loader = DataLoader(TensorDataset(images, labels), batch_size=25, shuffle=True)

model = timm.create_model("test_resnet", num_classes=5, in_chans=1)  # any timm name, e.g. resnet10t
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.steps)

step = 0
while step < args.steps:
    for x, y in loader:
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        scheduler.step()
        step += 1
        if step == args.steps:
            break
print(f"step {step}: loss {loss.item():.4f}")
