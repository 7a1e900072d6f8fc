"""What hooks, plugins and state objects may use of a learner, as a protocol.

``Task.learner`` and ``Batch.learner`` (and the ``learner`` argument of the setup hooks) are a
:class:`~metaopt.MetaLearner`; this protocol names the public surface plugins rely on, so that
the state objects, the hook specs and the engines are typed without importing the learner
(which imports them: no import circle).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import torch
from torch import nn


class LearnerView(Protocol):
    model: nn.Module
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    first_order: bool
    iteration: int
    adapted_names: list[str]
    inner_optimizer_name: str
    inner_optimizer_kwargs: dict[str, Any]

    @property
    def hook(self) -> Any: ...

    @property
    def plugins(self) -> list[object]: ...

    @property
    def inner_lrs(self) -> list[float]: ...

    @property
    def inner_steps(self) -> int: ...

    @property
    def eval_inner_steps(self) -> int: ...

    def get_plugin(self, name: str) -> object | None: ...

    def meta_parameters(self) -> Iterator[nn.Parameter]: ...

    def named_parameters(self, *args: Any, **kwargs: Any) -> Iterator[tuple[str, nn.Parameter]]: ...

    def lrs_for(self, steps: int, lr_scale: float = 1.0, lr: float | Sequence[float] | None = None) -> list[float]: ...

    def new_trajectory(self, task: Any, steps: int | None, lr_scale: float = 1.0, **kwargs: Any) -> Any: ...
