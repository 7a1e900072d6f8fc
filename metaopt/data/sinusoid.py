"""Sinusoid regression tasks (Finn et al., 2017): y = A sin(x - phi)."""

from __future__ import annotations

import math

import torch

from metaopt.data.sampler import TaskSampler
from metaopt.errors import ConfigError
from metaopt.task import TaskData


class SinusoidTasks(TaskSampler):
    """A ~ U[0.1, 5], phi ~ U[0, pi], x ~ U[-5, 5]; ``shots`` support and ``query`` query points."""

    def __init__(
        self,
        shots: int = 10,
        query: int = 10,
        seed: int = 0,
        amplitude: tuple[float, float] = (0.1, 5.0),
        phase: tuple[float, float] = (0.0, math.pi),
        x_range: tuple[float, float] = (-5.0, 5.0),
    ) -> None:
        if shots < 1 or query < 1:
            raise ConfigError(f"shots={shots} and query={query} must both be >= 1.")
        super().__init__(seed)
        self.shots, self.query = shots, query
        self.amplitude, self.phase, self.x_range = amplitude, phase, x_range

    def _uniform(self, low: float, high: float, *shape: int) -> torch.Tensor:
        return low + (high - low) * torch.rand(*shape, generator=self.generator)

    def sample_task(self) -> TaskData:
        a = self._uniform(*self.amplitude, 1)
        phi = self._uniform(*self.phase, 1)
        x = self._uniform(*self.x_range, self.shots + self.query, 1)
        y = a * torch.sin(x - phi)
        return TaskData(x[: self.shots], y[: self.shots], x[self.shots :], y[self.shots :])
