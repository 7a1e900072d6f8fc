"""Freeze the active pieces of piecewise-linear operations (ReLU masks, max-pool winners).

A finite difference of gradients across a kink (a ReLU that flips, a max-pool window whose
winner changes) picks up a jump that grows like 1/step.  :class:`FrozenPieces` records, on
one forward pass, which piece each such operation used, and replays those pieces on later
passes: the network is then the smooth function whose derivatives autograd reports at the
recorded point, so finite differences of its gradients converge to the exact Hessian-vector
products (what a second-order meta-gradient uses).

Covered: ``relu`` (every spelling, in place too), ``leaky_relu``, ``max_pool1d/2d/3d``
(functional and ``nn.MaxPool*``).  Smooth operations need nothing.  Others with kinks
(``abs``, ``clamp``, ``hardtanh``, ``max`` reductions) are not frozen.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from metaopt.errors import MetaOptError

_RELU = {F.relu, torch.relu, torch.Tensor.relu}
_RELU_INPLACE = {torch.relu_, torch.Tensor.relu_, F.relu_}
_LEAKY = {F.leaky_relu}
_POOL = {F.max_pool1d: 1, F.max_pool2d: 2, F.max_pool3d: 3}


def _inplace(func: Any, kwargs: dict[str, Any], args: tuple[Any, ...], position: int) -> bool:
    if func in _RELU_INPLACE:
        return True
    value = kwargs.get("inplace", args[position] if len(args) > position else False)
    return bool(value)


class FrozenPieces(TorchFunctionMode):
    """``with pieces.recording(): f(x)`` then ``with pieces.replaying(): f(x')`` (same op sequence)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[Any, Any]] = []
        self.replay = False
        self.cursor = 0

    def recording(self) -> FrozenPieces:
        self.records, self.replay, self.cursor = [], False, 0
        return self

    def replaying(self) -> FrozenPieces:
        self.replay, self.cursor = True, 0
        return self

    def __exit__(self, *exc: Any) -> Any:
        result = super().__exit__(*exc)
        if self.replay and exc[0] is None and self.cursor != len(self.records):
            raise MetaOptError(
                f"the replayed forward pass ran {self.cursor} piecewise-linear operations where the recorded one ran "
                f"{len(self.records)} (data-dependent control flow?). Use convergent_fo:freeze_activations=false."
            )
        return result

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in _RELU or func in _RELU_INPLACE:
            return self._relu(func, args, kwargs, slope=None)
        if func in _LEAKY:
            slope = kwargs.get("negative_slope", args[1] if len(args) > 1 else 0.01)
            return self._relu(func, args, kwargs, slope=float(slope))
        if func in _POOL:
            return self._pool(func, _POOL[func], args, kwargs)
        return func(*args, **kwargs)

    def _next(self, func: Any) -> Any:
        if self.cursor >= len(self.records) or self.records[self.cursor][0] is not func:
            seen = self.records[self.cursor][0] if self.cursor < len(self.records) else "nothing"
            raise MetaOptError(
                f"the replayed forward pass called {getattr(func, '__name__', func)} where the recorded one called "
                f"{getattr(seen, '__name__', seen)} (data-dependent control flow?). "
                "Use convergent_fo:freeze_activations=false."
            )
        record = self.records[self.cursor][1]
        self.cursor += 1
        return record

    def _relu(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], slope: float | None) -> Any:
        x = args[0]
        inplace = _inplace(func, kwargs, args, 2 if slope is not None else 1)
        if not self.replay:
            self.records.append((func, (x > 0).detach()))
            return func(*args, **kwargs)
        mask = self._next(func)
        factor = mask.to(x.dtype) if slope is None else torch.where(mask, 1.0, slope).to(x.dtype)
        return x.mul_(factor) if inplace else x * factor

    def _pool(self, func: Any, dims: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        x = args[0]
        wants_indices = bool(kwargs.get("return_indices", args[6] if len(args) > 6 else False))
        if not self.replay:
            call_args = args[:6]  # return_indices (7th) goes as a keyword
            out, indices = func(*call_args, **{**kwargs, "return_indices": True})
            self.records.append((func, indices.detach()))
            return (out, indices) if wants_indices else out
        indices = self._next(func)
        flat = x.flatten(-dims)
        out = flat.gather(-1, indices.flatten(-dims)).view_as(indices)
        return (out, indices) if wants_indices else out
