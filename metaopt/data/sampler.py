"""The sampler interface: seeded, deterministic, resumable."""

from __future__ import annotations

from typing import Any

import torch

from metaopt.task import TaskData


class TaskSampler:
    """Base class: ``sample(n)`` returns ``n`` tasks; the same seed gives the same tasks."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)

    def sample_task(self) -> TaskData:
        raise NotImplementedError

    def sample(self, n: int) -> list[TaskData]:
        return [self.sample_task() for _ in range(n)]

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
