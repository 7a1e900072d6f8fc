"""Data parallelism over tasks without DDP: one all-reduce of the finished meta-gradient.

DDP's reducer does not see the gradients that flow through a functional inner loop, and it never
synchronises grad-of-grad; the integrations (Lightning, the Hugging Face Trainer) therefore set
``MetaLearner.gradient_averager`` to :func:`mean_over_processes`, which ``learner.backward`` calls
once on the whole flattened meta-gradient.
"""

from __future__ import annotations

import torch


def world_size() -> int:
    """Processes in the default process group (1 when none is initialised)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def mean_over_processes(flat: torch.Tensor) -> torch.Tensor:
    """Mean of ``flat`` over the default process group (one all-reduce); itself in one process."""
    world = world_size()
    if world == 1:
        return flat
    torch.distributed.all_reduce(flat)
    return flat / world
