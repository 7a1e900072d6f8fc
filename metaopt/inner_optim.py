"""Differentiable inner optimizers, from ``higher.optim``, stepped with given gradients."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import higher
import torch

from metaopt.errors import ConfigError, suggest

INNER_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "rmsprop": torch.optim.RMSprop,
    "adagrad": torch.optim.Adagrad,
}


def make_template(name: str, params: Sequence[torch.Tensor], **kwargs: Any) -> torch.optim.Optimizer:
    """A plain torch optimizer over the meta-parameters; a template for per-trajectory copies."""
    if name not in INNER_OPTIMIZERS:
        raise ConfigError(
            f"inner_optimizer={name!r} is not known; use one of {sorted(INNER_OPTIMIZERS)}."
            + suggest(name, INNER_OPTIMIZERS)
        )
    try:
        return INNER_OPTIMIZERS[name](list(params), lr=1.0, **kwargs)
    except TypeError as exc:
        raise ConfigError(f"inner_optimizer_kwargs={kwargs!r} do not fit {name!r}: {exc}") from exc


def is_plain_sgd(template: torch.optim.Optimizer) -> bool:
    """SGD without momentum, weight decay or maximize: ``p - lr * g``, no optimizer state needed."""
    return isinstance(template, torch.optim.SGD) and all(
        not g["momentum"] and not g["weight_decay"] and not g.get("maximize", False) for g in template.param_groups
    )


def fresh_state(
    template: torch.optim.Optimizer, reference: Sequence[torch.Tensor]
) -> higher.optim.DifferentiableOptimizer | None:
    """A differentiable optimizer with empty state (one per inner trajectory).

    ``None`` for plain SGD, which :func:`diff_step` applies directly (the same maths as
    ``higher``'s SGD, without building a per-trajectory optimizer; it dominated small models).
    """
    if is_plain_sgd(template):
        return None
    return higher.optim.get_diff_optim(template, list(reference), track_higher_grads=True)


def diff_step(
    opt: higher.optim.DifferentiableOptimizer | None,
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    lr: float,
) -> list[torch.Tensor]:
    """One differentiable update with *given* gradients (``higher``'s ``step`` recomputes them).

    ``opt=None`` is plain SGD.  Otherwise mirrors ``DifferentiableOptimizer.step`` after its
    ``autograd.grad`` call; ``higher`` is archived, so these internals are stable.
    """
    if opt is None:
        # a float lr: one fused op per tensor, whose backward is one scaling (``p - lr * g``
        # costs a temporary in the forward and a negation in the backward); alpha takes no tensor
        if isinstance(lr, torch.Tensor):
            return [p if g is None else p - lr * g for p, g in zip(params, grads, strict=True)]
        return [p if g is None else p.add(g, alpha=-lr) for p, g in zip(params, grads, strict=True)]
    grouped = []
    for group, mapping in zip(opt.param_groups, opt._group_to_param_list, strict=True):
        group["lr"] = lr
        group_grads = []
        for i, index in enumerate(mapping):
            group["params"][i] = params[index]
            group_grads.append(grads[index])
        grouped.append(group_grads)
    opt._update(grouped)
    new = list(params)
    for group, mapping in zip(opt.param_groups, opt._group_to_param_list, strict=True):
        for p, index in zip(group["params"], mapping, strict=True):
            new[index] = p
    return new
