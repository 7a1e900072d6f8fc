"""A few meta-steps on a fixed meta-batch, used by the multi-process test.

Run by the test as ``python -m torch.distributed.run --nproc_per_node 2 distributed_job.py OUT``:
every process takes its share (``rank::world``) of the same 4-task batches; the test compares
the final parameters of both ranks with each other and with one process on the whole batches.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from metaopt import MetaLearner
from metaopt.models import mlp

STEPS = 3
CONFIGS: dict[str, list] = {
    "maml": [],
    "sharp_outer": [("sharp_maml", {"rho_inner": 0.0, "rho_outer": 0.05})],
    "hypermaml": [("hypermaml", {"hidden": 16})],
}


def batches() -> list[list[tuple[torch.Tensor, ...]]]:
    g = torch.Generator().manual_seed(123)
    return [
        [tuple(torch.randn(6, 1, generator=g, dtype=torch.float64) for _ in range(4)) for _ in range(4)]
        for _ in range(STEPS)
    ]


def train(name: str, accelerator=None, steps: int = STEPS) -> dict[str, torch.Tensor]:
    from metaopt.integrations.accelerate import prepare
    from metaopt.registry import create_plugin

    torch.manual_seed(0)
    plugins = [create_plugin(p, **opts) for p, opts in CONFIGS[name]]
    learner = MetaLearner(mlp().double(), plugins, inner_steps=2, inner_lr=0.05, loss_fn=F.mse_loss)
    learner = learner.double()
    rank, world = 0, 1
    if accelerator is not None:
        learner = prepare(learner, accelerator)
        rank, world = accelerator.process_index, accelerator.num_processes
    optimizer = torch.optim.Adam(learner.meta_parameters(), lr=1e-2)
    for batch in batches()[:steps]:
        optimizer.zero_grad(set_to_none=True)
        learner.backward(batch[rank::world])
        optimizer.step()
    return {k: v.detach().clone() for k, v in learner.state_dict().items()}


def train_from_loader(accelerator=None, steps: int = STEPS) -> dict[str, torch.Tensor]:
    """MAML fed by a DataLoader of tasks (batch size 4, no shuffling): passed through
    ``accelerator.prepare`` when there is one (each process then gets 2 of every 4 tasks), and
    ``shard`` must not slice those batches again."""
    from torch.utils.data import DataLoader

    from metaopt.integrations.accelerate import prepare, shard

    torch.manual_seed(0)
    learner = MetaLearner(mlp().double(), inner_steps=2, inner_lr=0.05, loss_fn=F.mse_loss).double()
    tasks = [task for batch in batches() for task in batch]
    world = 1 if accelerator is None else accelerator.num_processes
    loader = DataLoader(tasks, batch_size=4 // world, shuffle=False, collate_fn=list)
    if accelerator is not None:
        learner = prepare(learner, accelerator)
        loader = accelerator.prepare(loader)
    optimizer = torch.optim.Adam(learner.meta_parameters(), lr=1e-2)
    for step, batch in enumerate(loader):
        if step == steps:
            break
        local = shard(batch, accelerator, loader)
        assert len(local) == 4 // world, len(local)  # nothing dropped
        optimizer.zero_grad(set_to_none=True)
        learner.backward(local)
        optimizer.step()
    return {k: v.detach().clone() for k, v in learner.state_dict().items()}


def train_stacked(accelerator=None, prepared: bool = False, steps: int = STEPS) -> dict[str, torch.Tensor]:
    """MAML fed by a default-collated DataLoader (four tensors stacked over tasks), prepared or not;
    with two processes and an unprepared loader, ``shard(batch, accelerator, loader=None)`` slices."""
    from torch.utils.data import DataLoader

    from metaopt.integrations.accelerate import prepare, shard

    torch.manual_seed(0)
    learner = MetaLearner(mlp().double(), inner_steps=2, inner_lr=0.05, loss_fn=F.mse_loss).double()
    tasks = [task for batch in batches() for task in batch]
    world = 1 if accelerator is None else accelerator.num_processes
    loader = DataLoader(tasks, batch_size=4 // world if prepared else 4, shuffle=False)  # default collation
    if accelerator is not None:
        learner = prepare(learner, accelerator)
        if prepared:
            loader = accelerator.prepare(loader)
    optimizer = torch.optim.Adam(learner.meta_parameters(), lr=1e-2)
    for step, batch in enumerate(loader):
        if step == steps:
            break
        local = shard(batch, accelerator, loader if prepared else None)
        assert len(local) == 4 // world, len(local)
        optimizer.zero_grad(set_to_none=True)
        learner.backward(local)
        optimizer.step()
    return {k: v.detach().clone() for k, v in learner.state_dict().items()}


def refuses_a_missing_loader(accelerator) -> torch.Tensor:
    """1 when ``shard(batch, accelerator)`` without the loader is refused with the fix named."""
    from metaopt.errors import ConfigError
    from metaopt.integrations.accelerate import shard

    try:
        shard(batches()[0], accelerator)
    except ConfigError as exc:
        return torch.tensor(int("shard(batch, accelerator, loader)" in str(exc)))
    return torch.tensor(0)


if __name__ == "__main__":
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    results = {name: train(name, accelerator) for name in CONFIGS}
    results["prepared_loader"] = train_from_loader(accelerator)
    results["stacked_same_batch"] = train_stacked(accelerator, prepared=False)
    results["stacked_prepared"] = train_stacked(accelerator, prepared=True)
    results["_refuses_missing_loader"] = refuses_a_missing_loader(accelerator)
    results["_world"] = torch.tensor(accelerator.num_processes)
    torch.save(results, f"{sys.argv[1]}/rank{accelerator.process_index}.pt")
