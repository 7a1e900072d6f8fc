"""AFTER: the same script turned into meta-learning with metaopt (diff it against supervised.py).

python examples/meta.py --steps 30
"""

import argparse

import timm
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import metaopt
from metaopt.data import EpisodeDataset, collate_tasks
from metaopt.data.glyphs import GlyphTasks

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=30)
args = parser.parse_args()
torch.manual_seed(0)

glyphs = GlyphTasks(seed=0)
images = torch.cat([glyphs.draw(c, 40) for c in range(5)])
labels = torch.arange(5).repeat_interleave(40)
episodes = EpisodeDataset(TensorDataset(images, labels), ways=5, shots=1, query=5, labels=labels.tolist())
loader = DataLoader(episodes, batch_size=4, collate_fn=collate_tasks)  # items: (support_x, support_y, query_x, query_y)

model = timm.create_model("test_resnet", num_classes=5, in_chans=1)  # any timm name, e.g. resnet10t
learner = metaopt.MetaLearner(model, ["shot"], inner_steps=1, inner_lr=0.1, loss_fn=F.cross_entropy)
optimizer = torch.optim.Adam(learner.parameters(), lr=1e-3)
scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.steps)

step = 0
while step < args.steps:
    for batch in loader:
        optimizer.zero_grad()
        loss = learner.backward(batch).loss
        optimizer.step()
        scheduler.step()
        step += 1
        if step == args.steps:
            break
print(f"step {step}: loss {loss.item():.4f}")
