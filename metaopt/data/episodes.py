"""N-way K-shot episodes over any collection of classes of images."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from metaopt.data.sampler import TaskSampler
from metaopt.errors import ConfigError, DataError
from metaopt.task import TaskData

ClassImages = Mapping[str, torch.Tensor]
"""Class name -> tensor [n_images, C, H, W]."""


class EpisodeSampler(TaskSampler):
    """Each task: ``ways`` random classes, ``shots`` support and ``query`` query images each.

    Labels are 0..ways-1 in a random order per task.  Inputs are float tensors [N, C, H, W].
    """

    def __init__(self, classes: ClassImages, ways: int = 5, shots: int = 1, query: int = 15, seed: int = 0) -> None:
        super().__init__(seed)
        if ways < 2 or shots < 1 or query < 1:
            raise ConfigError(f"ways={ways}, shots={shots}, query={query}: need ways >= 2, shots >= 1, query >= 1.")
        self.names = sorted(classes)
        if ways > len(self.names):
            raise DataError(
                f"ways={ways} is larger than the {len(self.names)} classes available; lower --ways or add classes."
            )
        need = shots + query
        for name in self.names:
            if classes[name].shape[0] < need:
                raise DataError(
                    f"class {name!r} has {classes[name].shape[0]} images but shots+query = {shots}+{query} = {need} "
                    "are needed per class; lower --shots/--query."
                )
        self.images = [classes[n] for n in self.names]
        self.ways, self.shots, self.query = ways, shots, query

    def sample_task(self) -> TaskData:
        chosen = torch.randperm(len(self.images), generator=self.generator)[: self.ways].tolist()
        sx, qx = [], []
        for imgs in (self.images[c] for c in chosen):
            pick = torch.randperm(imgs.shape[0], generator=self.generator)[: self.shots + self.query]
            sx.append(imgs[pick[: self.shots]])
            qx.append(imgs[pick[self.shots :]])
        labels = torch.arange(self.ways)
        return TaskData(
            torch.cat(sx), labels.repeat_interleave(self.shots), torch.cat(qx), labels.repeat_interleave(self.query)
        )
