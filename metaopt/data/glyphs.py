"""Procedurally drawn glyph classes: an offline image task family that needs no download.

Each class is 2-4 random quadratic Bezier strokes (fixed by the class index and split);
each sample of a class is the glyph redrawn under a random affine jitter, control-point
noise and stroke-width noise.  Train and test classes come from disjoint seeds.
"""

from __future__ import annotations

import torch

from metaopt.data.sampler import TaskSampler
from metaopt.errors import ConfigError
from metaopt.task import TaskData

_SPLIT_OFFSET = {"train": 0, "val": 10_000_000, "test": 20_000_000}
_POINTS_PER_STROKE = 24


def glyph_prototype(index: int, split: str = "train") -> torch.Tensor:
    """Control points [strokes, 3, 2] in [-0.75, 0.75]^2 of class ``index`` of ``split``."""
    g = torch.Generator().manual_seed(_SPLIT_OFFSET[split] + index)
    strokes = int(torch.randint(2, 5, (1,), generator=g))
    return (torch.rand(strokes, 3, 2, generator=g) * 1.5 - 0.75).to(torch.float32)


def render(controls: torch.Tensor, size: int, width: torch.Tensor) -> torch.Tensor:
    """Rasterise n glyphs of Bezier strokes [n, S, 3, 2] with widths [n] to images [n, 1, size, size]."""
    n = controls.shape[0]
    t = torch.linspace(0, 1, _POINTS_PER_STROKE).view(1, 1, -1, 1)
    p0, p1, p2 = controls[:, :, 0:1], controls[:, :, 1:2], controls[:, :, 2:3]
    pts = ((1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2).reshape(n, -1, 2)
    axis = torch.linspace(-1, 1, size)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="xy"), dim=-1).reshape(1, -1, 2).expand(n, -1, -1)
    d2 = torch.cdist(grid, pts).min(dim=2).values ** 2
    return torch.exp(-d2 / (2 * width.view(n, 1) ** 2)).clamp(0, 1).reshape(n, 1, size, size)


class GlyphTasks(TaskSampler):
    """N-way K-shot episodes over ``num_classes`` synthetic glyph classes of one split."""

    def __init__(
        self,
        ways: int = 5,
        shots: int = 1,
        query: int = 15,
        num_classes: int = 1000,
        split: str = "train",
        size: int = 28,
        seed: int = 0,
        jitter: float = 1.0,
    ) -> None:
        if split not in _SPLIT_OFFSET:
            raise ConfigError(f"split={split!r} must be one of {sorted(_SPLIT_OFFSET)}.")
        if ways < 2 or shots < 1 or query < 1 or ways > num_classes:
            raise ConfigError(
                f"ways={ways}, shots={shots}, query={query}, num_classes={num_classes}: need 2 <= ways <= num_classes."
            )
        super().__init__(seed)
        self.ways, self.shots, self.query = ways, shots, query
        self.num_classes, self.split, self.size, self.jitter = num_classes, split, size, jitter
        self._prototypes: dict[int, torch.Tensor] = {}

    def _prototype(self, index: int) -> torch.Tensor:
        if index not in self._prototypes:
            self._prototypes[index] = glyph_prototype(index, self.split)
        return self._prototypes[index]

    def draw(self, index: int, n: int) -> torch.Tensor:
        """``n`` jittered samples [n, 1, size, size] of class ``index`` (drawn in one batch)."""
        g, j = self.generator, self.jitter
        base = self._prototype(index)
        angle = (torch.rand(n, generator=g) * 2 - 1) * 0.25 * j
        scale = 1 + (torch.rand(n, generator=g) * 2 - 1) * 0.12 * j
        shift = (torch.rand(n, 2, generator=g) * 2 - 1) * 0.1 * j
        noise = (torch.rand(n, *base.shape, generator=g) * 2 - 1) * 0.05 * j
        width = 0.07 * (1 + (torch.rand(n, generator=g) * 2 - 1) * 0.25 * j)
        c, s = torch.cos(angle), torch.sin(angle)
        rot = torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2) * scale.view(n, 1, 1)
        controls = torch.einsum("nskd,ned->nske", base + noise, rot) + shift.view(n, 1, 1, 2)
        return render(controls, self.size, width)

    def sample_task(self) -> TaskData:
        chosen = torch.randperm(self.num_classes, generator=self.generator)[: self.ways].tolist()
        sx, qx = [], []
        for c in chosen:
            imgs = self.draw(c, self.shots + self.query)
            sx.append(imgs[: self.shots])
            qx.append(imgs[self.shots :])
        labels = torch.arange(self.ways)
        return TaskData(
            torch.cat(sx), labels.repeat_interleave(self.shots), torch.cat(qx), labels.repeat_interleave(self.query)
        )
