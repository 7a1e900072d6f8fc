"""Speed workloads, registered by name: a model, a meta-batch size, inner steps and an inner rate.

Adding one is one entry (docs/benchmarks/README.md, "Adding a contender or a workload")::

    WORKLOADS.register("conv4 28px 5w1s, mb 16, K=3", Workload(model="conv4", meta_batch=16, steps=3, lr=0.2))

``model`` is "mlp" (sinusoid regression), "conv4" (28 px, 1 channel) or a timm name (84 px RGB);
:func:`make_batches` draws the same tasks for every contender (fixed generator).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from registry import Registry


@dataclass(frozen=True)
class Workload:
    model: str
    meta_batch: int
    steps: int
    lr: float

    def __getitem__(self, key: str) -> Any:  # wl["steps"], as the runners read it
        return getattr(self, key)


WORKLOADS: Registry[Workload] = Registry("workload")
for _name, _workload in {
    "sinusoid mlp, 10-shot, mb 25, K=1": Workload(model="mlp", meta_batch=25, steps=1, lr=0.01),
    "sinusoid mlp, 10-shot, mb 25, K=5": Workload(model="mlp", meta_batch=25, steps=5, lr=0.01),
    "conv4 28px 5w1s, mb 8, K=1": Workload(model="conv4", meta_batch=8, steps=1, lr=0.4),
    "conv4 28px 5w1s, mb 32, K=1": Workload(model="conv4", meta_batch=32, steps=1, lr=0.4),
    "conv4 28px 5w1s, mb 8, K=5": Workload(model="conv4", meta_batch=8, steps=5, lr=0.1),
    "conv4 28px 5w1s, mb 32, K=5": Workload(model="conv4", meta_batch=32, steps=5, lr=0.1),
    "resnet10t 84px 5w1s, mb 4, K=1": Workload(model="resnet10t", meta_batch=4, steps=1, lr=0.01),
    "resnet18 84px 5w1s, mb 4, K=1": Workload(model="resnet18", meta_batch=4, steps=1, lr=0.01),
}.items():
    WORKLOADS.register(_name, _workload)


def make_model(name: str):
    import torch

    from metaopt.models import conv4, mlp

    torch.manual_seed(0)
    if name == "mlp":
        return mlp()
    if name == "conv4":
        return conv4(num_classes=5)
    from metaopt.integrations.timm import backbone

    return backbone(name, num_classes=5, in_chans=3, img_size=84)


def make_batches(model: str, meta_batch: int, count: int):
    import torch

    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(count):
        tasks = []
        for _ in range(meta_batch):
            if model == "mlp":
                amp, phase = torch.rand(2, generator=g) * torch.tensor([4.9, 3.1416]) + torch.tensor([0.1, 0.0])
                x = torch.rand(20, 1, generator=g) * 10 - 5
                y = amp * torch.sin(x - phase)
                tasks.append((x[:10], y[:10], x[10:], y[10:]))
            else:
                chans, size = (1, 28) if model == "conv4" else (3, 84)
                sx = torch.rand(5, chans, size, size, generator=g)
                qx = torch.rand(75, chans, size, size, generator=g)
                tasks.append((sx, torch.arange(5), qx, torch.arange(5).repeat_interleave(15)))
        batches.append(tasks)
    return batches


def loss_of(model: str):
    """The workload's loss: MSE for the sinusoid MLP, cross-entropy for the classifiers."""
    import torch.nn.functional as F

    return F.mse_loss if model == "mlp" else F.cross_entropy
