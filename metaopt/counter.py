"""A training-iteration counter for plugins with schedules (warm-ups, annealing)."""

from __future__ import annotations

from typing import Any

from metaopt.hookspecs import hookimpl
from metaopt.task import Batch


class IterationCounter:
    """Counts training meta-batches in ``self.iteration``; the count is plugin state (checkpoints)."""

    iteration: int = 0

    @hookimpl
    def batch_end(self, batch: Batch) -> None:
        if batch.training:
            self.iteration += 1

    def state_dict(self) -> dict[str, Any]:
        return {"iteration": self.iteration}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.iteration = int(state["iteration"])
