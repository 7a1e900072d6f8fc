"""Normalisation layers written with plain tensor ops, for the batched-task (vmap) engine.

``torch.func.vmap`` gives a wrong second-order gradient through ``F.batch_norm`` and
``F.layer_norm`` (their backward's batching rule for ``grad_input``; pytorch/functorch #534,
still open on torch 2.14): a float64 meta-gradient through two inner steps of a conv+BN net
differs from finite differences.  The same maths as mean / variance / normalise / affine is
exact under vmap.  :class:`SafeNorms` routes ``torch.batch_norm``, ``torch.layer_norm``,
``torch.group_norm`` and ``torch.instance_norm`` — which ``F.batch_norm`` and the others call, so
however the model spells them: ``nn.BatchNorm2d``, timm's norm layers, a direct
``F.layer_norm(x, shape, self.w, self.b)`` call in the functional style of MAML code — through
these decompositions whenever the vmap engine runs: it is entered for every model, not only for
models that hold an ``nn`` norm module (a functional call leaves no module to find).  It swaps
those four attributes per thread, so other torch calls pay nothing; :class:`SafeNormsMode` (a
``TorchFunctionMode``, one Python dispatch per torch call) does the same for a function bound
before the swap, and inside ``torch.compile`` (docs/engines.md).

Running statistics are never written here: under ``bn_policy="transductive"`` they are never
read either, and under ``"running"`` BatchNorm runs in eval mode and only reads them.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


def batch_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> torch.Tensor:
    """``F.batch_norm`` without the running-statistics update (see the module docstring).

    Written as ``input * scale + shift`` with per-channel ``scale``, ``shift``: two passes over
    the activations (statistics, then one fused multiply-add) instead of four.
    """
    shape = [1, input.shape[1]] + [1] * (input.dim() - 2)
    if training or running_mean is None or running_var is None:
        var, mean = torch.var_mean(input, dim=[0, *range(2, input.dim())], keepdim=True, correction=0)
    else:
        mean, var = running_mean.reshape(shape), running_var.reshape(shape)
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight.reshape(shape)
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias.reshape(shape)
    return torch.addcmul(shift, input, scale)


def layer_norm(
    input: torch.Tensor,
    normalized_shape: Sequence[int],
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    var, mean = torch.var_mean(input, dim=list(range(-len(normalized_shape), 0)), keepdim=True, correction=0)
    y = (input - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        return y * weight if bias is None else torch.addcmul(bias, y, weight)
    return y if bias is None else y + bias


def group_norm(
    input: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    n, c = input.shape[0], input.shape[1]
    grouped = input.reshape(n, num_groups, -1)
    var, mean = torch.var_mean(grouped, dim=-1, keepdim=True, correction=0)
    y = ((grouped - mean) * torch.rsqrt(var + eps)).reshape(input.shape)
    shape = [1, c] + [1] * (input.dim() - 2)
    if weight is not None:
        y = y * weight.reshape(shape)
    return y if bias is None else y + bias.reshape(shape)


def instance_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None = None,
    running_var: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> torch.Tensor:
    """``F.instance_norm`` without the running-statistics update: per example and channel."""
    if not use_input_stats and running_mean is not None and running_var is not None:
        return batch_norm(input, running_mean, running_var, weight, bias, False, momentum, eps)
    var, mean = torch.var_mean(input, dim=list(range(2, input.dim())), keepdim=True, correction=0)
    y = (input - mean) * torch.rsqrt(var + eps)
    shape = [1, input.shape[1]] + [1] * (input.dim() - 2)
    if weight is not None:
        y = y * weight.reshape(shape)
    return y if bias is None else y + bias.reshape(shape)


def _torch_batch_norm(
    input: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    cudnn_enabled: bool = True,
) -> torch.Tensor:
    """``torch.batch_norm``'s argument order (what ``F.batch_norm`` calls) onto :func:`batch_norm`."""
    return batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)


def _torch_layer_norm(
    input: torch.Tensor,
    normalized_shape: Sequence[int],
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    cudnn_enable: bool = True,
) -> torch.Tensor:
    return layer_norm(input, normalized_shape, weight, bias, eps)


def _torch_group_norm(
    input: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    cudnn_enabled: bool = True,
) -> torch.Tensor:
    return group_norm(input, num_groups, weight, bias, eps)


def _torch_instance_norm(
    input: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    use_input_stats: bool,
    momentum: float,
    eps: float,
    cudnn_enabled: bool = True,
) -> torch.Tensor:
    return instance_norm(input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps)


#: the ``torch.*`` norm functions that every ``F.*`` one calls, by name, with their replacements
_TORCH_LEVEL = {
    "batch_norm": _torch_batch_norm,
    "layer_norm": _torch_layer_norm,
    "group_norm": _torch_group_norm,
    "instance_norm": _torch_instance_norm,
}
_ORIGINALS = {name: getattr(torch, name) for name in _TORCH_LEVEL}
_REPLACEMENTS: dict[Any, Any] = {
    F.batch_norm: batch_norm,
    F.layer_norm: layer_norm,
    F.group_norm: group_norm,
    F.instance_norm: instance_norm,
    **{_ORIGINALS[name]: replacement for name, replacement in _TORCH_LEVEL.items()},
}
_local = threading.local()
_lock = threading.Lock()
_holders = 0  # threads inside SafeNorms: the torch.* attributes are routed while it is > 0


#: what the torch attributes held when the routing was installed (torch's functions, or another
#: library's wrappers of them): other threads keep calling these, and they are put back after
_outside: dict[str, Any] = dict(_ORIGINALS)


def _routed(name: str) -> Any:
    replacement = _TORCH_LEVEL[name]

    def routed(*args: Any, **kwargs: Any) -> Any:
        return (replacement if getattr(_local, "depth", 0) else _outside[name])(*args, **kwargs)

    routed.__name__ = routed.__qualname__ = name
    routed.__doc__ = f"torch.{name}, routed through metaopt.norms in a thread inside SafeNorms."
    return routed


_ROUTED = {name: _routed(name) for name in _TORCH_LEVEL}


class SafeNorms:
    """While active in this thread, ``torch.batch_norm`` / ``layer_norm`` / ``group_norm`` /
    ``instance_norm`` — which ``F.batch_norm`` and the others, and so every ``nn`` norm module,
    call — run as plain tensor ops.

    The ``torch`` attributes are swapped for routing functions while any thread is inside (other
    threads still get torch's own kernels: the routing reads a thread-local flag), so a torch call
    that is not a norm pays nothing.  A ``torch.batch_norm`` function object bound before that
    (``from torch import layer_norm``) is not seen: :class:`SafeNormsMode` catches it too.
    """

    def __enter__(self) -> SafeNorms:
        global _holders
        depth = getattr(_local, "depth", 0)
        if depth == 0:
            with _lock:
                if _holders == 0:
                    for name, routed in _ROUTED.items():
                        current = getattr(torch, name)
                        if current is not routed:  # (never remember the routing itself as the outside)
                            _outside[name] = current
                        setattr(torch, name, routed)
                _holders += 1
        _local.depth = depth + 1
        return self

    def __exit__(self, *exc: Any) -> None:
        global _holders
        _local.depth -= 1
        if _local.depth == 0:
            with _lock:
                _holders -= 1
                if _holders == 0:
                    for name, outside in _outside.items():
                        setattr(torch, name, outside)


def routing() -> bool:
    """Whether :class:`SafeNorms` is active in this thread."""
    return getattr(_local, "depth", 0) > 0


class SafeNormsMode(TorchFunctionMode):
    """The same replacement as a ``TorchFunctionMode``: it sees every torch call, however bound.

    Used where :class:`SafeNorms` cannot be: inside ``torch.compile`` (dynamo traces a mode), and
    by the vmap engine on its first batch, which records in :attr:`bound` whether a ``torch.*`` norm
    function was called without passing through the routed attribute (then the engine keeps the
    mode).  Its cost is one Python dispatch per torch call.
    """

    def __init__(self, audit: bool = False) -> None:
        super().__init__()
        self.audit, self.bound = audit, False

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        replacement = _REPLACEMENTS.get(func)
        if replacement is None:
            return func(*args, **(kwargs or {}))
        if self.audit and func in _ORIGINAL_SET:
            self.bound = True
        return replacement(*args, **(kwargs or {}))


_ORIGINAL_SET = set(_ORIGINALS.values())


def active_norm_kinds() -> list[type]:
    """The norm routing active now in this thread, as classes to enter again (e.g. when the outer
    backward replays a step: memory="recompute")."""
    kinds: list[type] = [SafeNorms] if routing() else []
    if any(isinstance(mode, SafeNormsMode) for mode in torch.overrides._get_current_function_mode_stack()):
        kinds.append(SafeNormsMode)
    return kinds
