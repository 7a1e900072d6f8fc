"""meta.py on accelerate: any device, bf16, several processes (data-parallel over tasks).

python examples/meta_accelerate.py --steps 30
ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2 examples/meta_accelerate.py   # 2 CPU processes (gloo)
(`accelerate launch --cpu --num_processes 2` starts one process only: accelerate issue #2741)
accelerate launch --mixed_precision bf16 examples/meta_accelerate.py       # bf16 autocast
"""

import argparse

import timm
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch.utils.data import DataLoader

import metaopt
from metaopt.data.glyphs import GlyphTasks
from metaopt.integrations.accelerate import prepare, register_for_checkpointing, shard

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=30)
args = parser.parse_args()
torch.manual_seed(0)  # same seed on every process: identical initial weights
accelerator = Accelerator()

glyphs = GlyphTasks(ways=5, shots=1, query=5, seed=0)
tasks = [glyphs.sample_task() for _ in range(200)]
loader = DataLoader(tasks, batch_size=4, shuffle=True, collate_fn=list)

model = timm.create_model("test_resnet", num_classes=5, in_chans=1)  # any timm name, e.g. resnet10t
learner = metaopt.MetaLearner(model, ["shot"], inner_steps=1, inner_lr=0.1, loss_fn=F.cross_entropy)
learner = prepare(learner, accelerator)  # not accelerator.prepare(learner): metaopt syncs meta-gradients itself
optimizer = torch.optim.Adam(learner.parameters(), lr=1e-3)
scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.steps)
optimizer, scheduler = accelerator.prepare(optimizer, scheduler)
register_for_checkpointing(accelerator, learner)  # accelerator.save_state()/load_state() include the learner
world = accelerator.num_processes

step = 0
while step < args.steps:
    for batch in loader:  # every process draws the same batch (same seed) and adapts its share
        optimizer.zero_grad()
        loss = learner.backward(shard(batch, accelerator, loader)).loss
        optimizer.step()
        scheduler.step()
        step += 1
        if step == args.steps:
            break
accelerator.print(f"step {step}: loss {loss.item():.4f} ({world} process(es), precision {accelerator.mixed_precision})")
