"""Outer optimizers: torch's, plus normalized / clipped SGD with momentum.

The MAML objective is not L-smooth (its smoothness grows with the meta-gradient norm), so
a normalized or clipped outer step is what the convergent first-order analysis needs; the
optimizer works with any plugin.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from metaopt.errors import ConfigError, suggest


class NormalizedSGD(torch.optim.Optimizer):
    """m <- beta m + (1 - beta) g;  theta <- theta - lr * s(m) * m.

    ``mode="normalize"``: s(m) = 1 / ||m||.  ``mode="clip"``: s(m) = min(1, clip / ||m||).
    The norm is global over every parameter of every group.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        momentum: float = 0.9,
        mode: str = "normalize",
        clip: float = 1.0,
        eps: float = 1e-12,
    ) -> None:
        if not lr > 0:
            raise ConfigError(f"lr={lr} must be > 0.")
        if not 0.0 <= momentum < 1.0:
            raise ConfigError(f"momentum={momentum} must be in [0, 1).")
        if mode not in ("normalize", "clip"):
            raise ConfigError(f"mode={mode!r} must be 'normalize' or 'clip'.")
        if not clip > 0:
            raise ConfigError(f"clip={clip} must be > 0.")
        super().__init__(params, {"lr": lr, "momentum": momentum, "mode": mode, "clip": clip, "eps": eps})

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        buffers = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                m = state["momentum_buffer"]
                m.mul_(group["momentum"]).add_(p.grad, alpha=1 - group["momentum"])
                buffers.append((group, p, m))
        if not buffers:
            return loss
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(m) for _, _, m in buffers]))
        for group, p, m in buffers:
            if group["mode"] == "normalize":
                scale = 1.0 / (norm + group["eps"])
            else:
                scale = torch.clamp(group["clip"] / (norm + group["eps"]), max=1.0)
            p.add_(m * scale, alpha=-group["lr"])
        return loss


OUTER_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam,
    "sgd": torch.optim.SGD,
    "normalized_sgd": NormalizedSGD,
}


def make_outer_optimizer(name: str, params: Iterable[Any], lr: float, **kwargs: Any) -> torch.optim.Optimizer:
    """metaopt's outer optimizers (adam, sgd, normalized_sgd), else any name of timm's optimizer
    factory (adamw, lamb, lion, ...: ``timm.optim.list_optimizers()``).  ``params`` may be groups."""
    import timm.optim

    timm_names = timm.optim.list_optimizers()
    if name not in OUTER_OPTIMIZERS and name not in timm_names:
        known = [*OUTER_OPTIMIZERS, *timm_names]
        raise ConfigError(
            f"outer_optimizer={name!r} is not known; use one of {sorted(OUTER_OPTIMIZERS)} or a timm optimizer "
            f"(timm.optim.list_optimizers(), e.g. adamw).{suggest(name, known)}"
        )
    try:
        if name in OUTER_OPTIMIZERS:
            return OUTER_OPTIMIZERS[name](params, lr=lr, **kwargs)
        return timm.optim.create_optimizer_v2(list(params), opt=name, lr=lr, filter_bias_and_bn=False, **kwargs)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"outer_optimizer_kwargs {kwargs!r} do not fit {name!r}: {exc}") from exc


def param_groups(named: Iterable[tuple[str, torch.nn.Parameter]], lrs: dict[str, float]) -> list[dict[str, Any]]:
    """Parameter groups for ``lrs`` (name prefix -> learning rate; first matching prefix wins).

    Parameters that match no prefix form the first group (the optimizer's own lr).  A prefix
    that matches nothing is an error naming the top-level names there are.
    """
    named = list(named)
    groups: dict[str | None, list[torch.nn.Parameter]] = {None: [], **{prefix: [] for prefix in lrs}}
    for name, p in named:
        prefix = next((q for q in lrs if name.startswith(q)), None)
        groups[prefix].append(p)
    empty = [q for q in lrs if not groups[q]]
    if empty:
        tops = sorted({n.rsplit(".", 2)[0] + "." for n, _ in named})
        raise ConfigError(f"param_group_lr prefixes {empty} match no meta-parameter; names start with {tops[:12]}.")
    out = [{"params": groups[None]}] if groups[None] else []
    return out + [{"params": groups[q], "lr": float(lrs[q])} for q in lrs]
