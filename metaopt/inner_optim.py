"""Differentiable inner optimizers stepped with given gradients.

``sgd`` without state is applied directly; ``adam`` is :class:`ExactAdam` (the update of
``torch.optim.Adam`` exactly); ``higher_adam``, ``rmsprop``, ``adagrad`` and SGD with momentum
come from ``higher.optim``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import higher
import torch

from metaopt.errors import ConfigError, suggest

INNER_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "higher_adam": torch.optim.Adam,
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
        template = INNER_OPTIMIZERS[name](list(params), lr=1.0, **kwargs)
    except TypeError as exc:
        raise ConfigError(f"inner_optimizer_kwargs={kwargs!r} do not fit {name!r}: {exc}") from exc
    template.metaopt_exact_adam = name == "adam"  # type: ignore[attr-defined]
    return template


def _safe_sqrt(v: torch.Tensor) -> torch.Tensor:
    """``sqrt(v)`` for ``v >= 0`` whose derivative at 0 is 0 instead of inf (so inf * 0 = NaN never occurs)."""
    positive = v > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, v, torch.ones_like(v))), torch.zeros_like(v))


class ExactAdam:
    """A differentiable Adam with ``torch.optim.Adam``'s update, operation for operation.

    ``higher``'s Adam adds ``eps`` to ``sqrt(v)`` *before* the bias correction, so one step
    differs from ``torch.optim.Adam.step()`` (by 1.8e-5 at eps=1e-8, 3.5e-2 at eps=1e-3 in
    an audit); this one adds it after, as torch does.  The square root has derivative 0 where
    the second moment is exactly 0 (a parameter whose gradient is 0), so a second-order
    meta-gradient never turns ``inf * 0`` into NaN.  Options: ``betas``, ``eps``,
    ``weight_decay``, ``amsgrad``, ``maximize``, ``decoupled_weight_decay`` (AdamW).
    """

    def __init__(self, template: torch.optim.Adam, count: int) -> None:
        group = template.param_groups[0]
        self.beta1, self.beta2 = (float(b) for b in group["betas"])
        self.eps, self.weight_decay = float(group["eps"]), float(group["weight_decay"])
        self.amsgrad, self.maximize = bool(group["amsgrad"]), bool(group["maximize"])
        self.decoupled = bool(group.get("decoupled_weight_decay", False))
        self.steps = [0] * count
        self.exp_avg: list[torch.Tensor | None] = [None] * count
        self.exp_avg_sq: list[torch.Tensor | None] = [None] * count
        self.max_exp_avg_sq: list[torch.Tensor | None] = [None] * count

    def step(self, params: list[torch.Tensor], grads: list[torch.Tensor | None], lr: float) -> list[torch.Tensor]:
        new = list(params)
        for i, (p, g) in enumerate(zip(params, grads, strict=True)):
            if g is None:
                continue
            g = -g if self.maximize else g
            if self.weight_decay:
                if self.decoupled:
                    p = p * (1 - lr * self.weight_decay)
                else:
                    g = g + self.weight_decay * p
            m = torch.zeros_like(p) if self.exp_avg[i] is None else self.exp_avg[i]
            v = torch.zeros_like(p) if self.exp_avg_sq[i] is None else self.exp_avg_sq[i]
            self.steps[i] += 1
            m = torch.lerp(m, g, 1 - self.beta1)
            v = torch.addcmul(v * self.beta2, g, g, value=1 - self.beta2)
            self.exp_avg[i], self.exp_avg_sq[i] = m, v
            bias_correction1 = 1 - self.beta1 ** self.steps[i]
            bias_correction2_sqrt = (1 - self.beta2 ** self.steps[i]) ** 0.5
            if self.amsgrad:
                previous = self.max_exp_avg_sq[i]
                v = v if previous is None else torch.maximum(previous, v)
                self.max_exp_avg_sq[i] = v
            denom = _safe_sqrt(v) / bias_correction2_sqrt + self.eps
            new[i] = p - (lr / bias_correction1) * (m / denom)
        return new


def is_plain_sgd(template: torch.optim.Optimizer) -> bool:
    """SGD without momentum, weight decay or maximize: ``p - lr * g``, no optimizer state needed."""
    return isinstance(template, torch.optim.SGD) and all(
        not g["momentum"] and not g["weight_decay"] and not g.get("maximize", False) for g in template.param_groups
    )


InnerOptimizer = higher.optim.DifferentiableOptimizer | ExactAdam | None


def fresh_state(template: torch.optim.Optimizer, reference: Sequence[torch.Tensor]) -> InnerOptimizer:
    """A differentiable optimizer with empty state (one per inner trajectory).

    ``None`` for plain SGD, which :func:`diff_step` applies directly (the same maths as
    ``higher``'s SGD, without building a per-trajectory optimizer; it dominated small models).
    """
    if is_plain_sgd(template):
        return None
    if getattr(template, "metaopt_exact_adam", False):
        return ExactAdam(template, len(list(reference)))
    return higher.optim.get_diff_optim(template, list(reference), track_higher_grads=True)


def diff_step(
    opt: InnerOptimizer,
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
    if isinstance(opt, ExactAdam):
        return opt.step(params, grads, lr)
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
