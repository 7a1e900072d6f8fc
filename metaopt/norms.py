"""Normalisation layers written with plain tensor ops, for the batched-task (vmap) engine.

``torch.func.vmap`` gives a wrong second-order gradient through ``F.batch_norm`` and
``F.layer_norm`` (their backward's batching rule for ``grad_input``; pytorch/functorch #534,
still open on torch 2.14): a float64 meta-gradient through two inner steps of a conv+BN net
differs from finite differences.  The same maths as mean / variance / normalise / affine is
exact under vmap.  :class:`SafeNorms` routes ``F.batch_norm``, ``F.layer_norm``,
``F.group_norm`` and ``F.instance_norm`` (however the model spells them: ``nn.BatchNorm2d``,
timm's norm layers, a direct ``F.layer_norm(x, shape, self.w, self.b)`` call in the functional
style of MAML code) through these decompositions whenever the vmap engine runs: it is entered
for every model, not only for models that hold an ``nn`` norm module (a functional call leaves
no module to find).  Its cost on a model without normalisation is one Python dispatch per torch
call (about 6% on the sinusoid MLP, docs/engines.md).

Running statistics are never written here: under ``bn_policy="transductive"`` they are never
read either, and under ``"running"`` BatchNorm runs in eval mode and only reads them.
"""

from __future__ import annotations

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


_REPLACEMENTS = {
    F.batch_norm: batch_norm,
    F.layer_norm: layer_norm,
    F.group_norm: group_norm,
    F.instance_norm: instance_norm,
}


class SafeNorms(TorchFunctionMode):
    """While active, ``F.batch_norm`` / ``F.layer_norm`` / ``F.group_norm`` / ``F.instance_norm`` run as
    plain tensor ops."""

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        replacement = _REPLACEMENTS.get(func)
        return (replacement or func)(*args, **(kwargs or {}))
