"""First-order MAML family: FOMAML, Reptile, and a convergent first-order estimator.

The convergent estimator replaces each Hessian-vector product of the exact meta-gradient
J^T grad L_Q(theta_K), J = prod_k (I - a_k H_S(theta_k)), by a finite difference of support
gradients along the current vector, walking back over the stored inner iterates; no
second-order graph is built, so memory stays flat in the number of inner steps.
"""

from __future__ import annotations

import torch

from metaopt.builtin import query_loss
from metaopt.errors import ConfigError
from metaopt.hookspecs import hookimpl
from metaopt.task import Params, Task, global_norm, grad_dict


def zero_valued(loss: torch.Tensor, params: Params, direction: Params) -> torch.Tensor:
    """``loss`` plus a term of value 0 whose gradient w.r.t. ``params`` is ``direction``."""
    linear = sum((params[n] * direction[n].detach()).sum() for n in direction)
    return loss + linear - linear.detach()


class FOMAML:
    """First-order MAML: the meta-gradient is grad L_Q at the adapted parameters."""

    name = "fomaml"
    forces_first_order = True

    @hookimpl
    def task_start(self, task: Task) -> None:
        task.second_order = False


class Reptile:
    """Reptile: meta-gradient (theta - theta_K) / (sum of inner learning rates)."""

    name = "reptile"
    forces_first_order = True
    incompatible_with = {"convergent_fo": "both define the meta-gradient; use one of them."}

    def __init__(self, scale: float | None = None) -> None:
        if scale is not None and scale <= 0:
            raise ConfigError(f"scale={scale} must be > 0 (or None for 1 / (alpha * K)).")
        self.scale = scale

    @hookimpl
    def task_start(self, task: Task) -> None:
        task.second_order = False

    @hookimpl
    def outer_loss(self, task: Task, params: Params) -> torch.Tensor:
        loss = query_loss(task, params).detach()  # reported only; Reptile needs no query gradient
        assert task.trajectory is not None
        total_lr = sum(task.trajectory.lrs) or 1.0
        scale = self.scale if self.scale is not None else 1.0 / total_lr
        direction = {n: (task.start[n] - params[n]).detach() * scale for n in params}
        return zero_valued(loss, task.start, direction)


def fd_hvp(task: Task, point: Params, vector: Params, delta: float, symmetric: bool) -> Params:
    """H_S(point) @ vector by finite differences of support gradients, step delta * v / |v|."""
    norm = float(global_norm(vector))
    if norm == 0.0:
        return {n: torch.zeros_like(v) for n, v in vector.items()}
    r = delta / norm

    def grad_at(sign: float) -> Params:
        shifted = {n: (point[n].detach() + sign * r * vector[n]).requires_grad_() for n in point}
        with torch.enable_grad():
            return grad_dict(task.support_loss(shifted), shifted, create_graph=False)

    plus = grad_at(1.0)
    if symmetric:
        minus = grad_at(-1.0)
        return {n: (plus[n] - minus[n]) / (2 * r) for n in plus}
    base = grad_at(0.0)
    return {n: (plus[n] - base[n]) / r for n in plus}


class ConvergentFO:
    """Convergent first-order MAML: finite-difference Hessian-vector products, no second-order graph."""

    name = "convergent_fo"
    forces_first_order = True

    def __init__(self, delta: float = 1e-3, estimator: str = "symmetric") -> None:
        if delta <= 0:
            raise ConfigError(f"delta={delta} must be > 0 (a relative perturbation size, e.g. 1e-3).")
        if estimator not in ("symmetric", "forward"):
            raise ConfigError(f"estimator={estimator!r} must be 'symmetric' or 'forward'.")
        self.delta = delta
        self.symmetric = estimator == "symmetric"

    @hookimpl
    def configure(self, learner) -> None:
        if learner.inner_optimizer_name != "sgd" or learner.inner_optimizer_kwargs:
            raise ConfigError(
                f"convergent_fo assumes plain SGD inner steps; got inner_optimizer={learner.inner_optimizer_name!r} "
                f"with {learner.inner_optimizer_kwargs}. Use inner_optimizer='sgd' without momentum."
            )

    @hookimpl
    def task_start(self, task: Task) -> None:
        task.second_order = False

    @hookimpl
    def outer_loss(self, task: Task, params: Params) -> torch.Tensor:
        loss = query_loss(task, params)
        if not task.training:
            return loss
        assert task.trajectory is not None
        g = grad_dict(loss, params, create_graph=False, retain_graph=True)
        v = dict(g)
        for k in reversed(range(task.trajectory.steps)):
            hv = fd_hvp(task, task.trajectory.iterates[k], v, self.delta, self.symmetric)
            v = {n: v[n] - task.trajectory.lrs[k] * hv[n] for n in v}
        # theta_K depends on theta with identity Jacobian (first-order trajectory), so the
        # query loss already contributes g; the zero-valued term turns g into v.
        return zero_valued(loss, params, {n: v[n] - g[n] for n in v})
