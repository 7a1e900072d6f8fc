"""First-order MAML family: FOMAML, Reptile, and a convergent first-order estimator.

The convergent estimator replaces each Hessian-vector product of the exact meta-gradient
J^T grad L_Q(theta_K), J = prod_k (I - a_k H_S(theta_k)), by a finite difference of support
gradients along the current vector, walking back over the stored inner iterates; no
second-order graph is built, so memory stays flat in the number of inner steps.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from metaopt.builtin import query_loss
from metaopt.errors import ConfigError, PluginConflictError
from metaopt.hookspecs import hookimpl
from metaopt.piecewise import FrozenPieces
from metaopt.task import Params, Task, global_norm, grad_dict


def zero_valued(loss: torch.Tensor, params: Params, direction: Params) -> torch.Tensor:
    """``loss`` plus a term of value 0 whose gradient w.r.t. ``params`` is ``direction``."""
    linear = sum((params[n] * direction[n].detach()).sum() for n in direction)
    return loss + linear - linear.detach()


class FOMAML:
    """First-order MAML: the meta-gradient is grad L_Q at the adapted parameters."""

    name = "fomaml"
    vmap_safe = True  # runs under engine="vmap" (tests/test_engine.py, tests/plugins/test_combinations.py)
    forces_first_order = True
    incompatible_with = {
        "reptile": "Reptile defines its own first-order meta-gradient and replaces FOMAML's; list only one of them.",
        "convergent_fo": "convergent_fo is a first-order estimator of the full MAML meta-gradient and replaces "
        "FOMAML's grad L_Q(theta_K); list only one of them.",
    }

    @hookimpl
    def task_start(self, task: Task) -> None:
        task.second_order = False


class Reptile:
    """Reptile: meta-gradient (theta - theta_K) / (sum of inner learning rates)."""

    name = "reptile"
    vmap_safe = True  # runs under engine="vmap" (tests/test_engine.py, tests/plugins/test_combinations.py)
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


def fd_hvp(
    task: Task,
    point: Params,
    vector: Params,
    delta: float,
    symmetric: bool,
    others: Params | None = None,
    pieces: FrozenPieces | None = None,
) -> tuple[Params, Params]:
    """H_S(point) @ vector by finite differences of support gradients, step delta * v / |v|.

    Also returns the mixed block d/d(others) of <grad L_S, vector> for the trainable parameters
    that are not adapted (``others``), from the same perturbed gradients.  With ``pieces``,
    ReLU masks and max-pool winners are those of ``point`` at every perturbed point.  Under
    ``engine="vmap"`` the step size stays a tensor (each task its own) and gradients come from
    ``task.grad``; the loop engine reads the norm on the host, as it always has.
    """
    others = others or {}
    if task.vectorised:
        norm = global_norm(vector)
        # a zero vector gives plus == minus, so any finite step returns the exact zero product
        r: Any = delta / torch.where(norm > 0, norm, torch.ones_like(norm))
    else:
        host_norm = float(global_norm(vector))
        if host_norm == 0.0:
            zeros = {n: torch.zeros_like(v) for n, v in vector.items()}
            return zeros, {n: torch.zeros_like(p) for n, p in others.items()}
        r = delta / host_norm
    fixed = {n: p.detach() for n, p in point.items()}

    def grad_at(sign: float, mode: contextlib.AbstractContextManager[Any]) -> Params:
        if task.vectorised:
            shifted = {n: fixed[n] + sign * r * vector[n] for n in point}

            def loss_at(values: Params) -> torch.Tensor:
                with mode:
                    return task.support_loss(values)

            return task.grad(loss_at, {**shifted, **others}, create_graph=False)
        shifted = {n: (fixed[n] + sign * r * vector[n]).requires_grad_() for n in point}
        with torch.enable_grad(), mode:
            loss = task.support_loss(shifted)
        return grad_dict(loss, {**shifted, **others}, create_graph=False)

    def replay() -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext() if pieces is None else pieces.replaying()

    if symmetric:
        if pieces is not None:
            with torch.no_grad(), pieces.recording():
                task.support_loss(fixed)
        plus, minus, scale = grad_at(1.0, replay()), grad_at(-1.0, replay()), 2 * r
    else:
        minus = grad_at(0.0, contextlib.nullcontext() if pieces is None else pieces.recording())
        plus, scale = grad_at(1.0, replay()), r
    diff = {n: (plus[n] - minus[n]) / scale for n in plus}
    return {n: diff[n] for n in point}, {n: diff[n] for n in others}


class ConvergentFO:
    """Convergent first-order MAML: finite-difference Hessian-vector products, no second-order graph."""

    name = "convergent_fo"
    forces_first_order = True
    vmap_safe = True  # per-task step sizes stay tensors under vmap (tests/plugins/test_first_order.py)
    #: read by engine="compile" (refused) and engine="auto" (vmap or the loop instead)
    compile_unsupported = (
        "it replays the ReLU/max-pool pieces recorded on each task through a TorchFunctionMode, which "
        "torch.compile does not trace"
    )

    def __init__(self, delta: float = 1e-3, estimator: str = "symmetric", freeze_activations: bool = True) -> None:
        if delta <= 0:
            raise ConfigError(f"delta={delta} must be > 0 (a relative perturbation size, e.g. 1e-3).")
        if estimator not in ("symmetric", "forward"):
            raise ConfigError(f"estimator={estimator!r} must be 'symmetric' or 'forward'.")
        self.delta = delta
        self.symmetric = estimator == "symmetric"
        self.freeze_activations = bool(freeze_activations)

    @hookimpl
    def configure(self, learner) -> None:
        sharp = learner.get_plugin("sharp_maml")
        if sharp is not None and getattr(sharp, "rho_inner", 0) > 0:
            raise PluginConflictError(
                "plugins 'convergent_fo' and 'sharp_maml' cannot be combined with rho_inner > 0: the estimator's "
                "recursion assumes plain SGD inner steps, and inner SAM steps along grad L_S(theta_k + eps_k), so "
                "its Hessian-vector products would be taken at the wrong points. Use sharp_maml with rho_outer only "
                "(outer SAM works with convergent_fo), or second-order MAML with inner SAM."
            )
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
        if not task.training:
            return query_loss(task, params)
        assert task.trajectory is not None
        if task.vectorised:  # torch.func.grad differentiates a function: one more query forward
            g = task.grad(lambda p: query_loss(task, p), params, create_graph=False)
            loss = query_loss(task, params)
        else:
            loss = query_loss(task, params)
            g = grad_dict(loss, params, create_graph=False, retain_graph=True)
        v = dict(g)
        learner = task.learner
        others = {n: p for n, p in learner.model.named_parameters() if p.requires_grad and n not in params}
        mixed = {n: torch.zeros_like(p) for n, p in others.items()}
        pieces = FrozenPieces() if self.freeze_activations else None
        for k in reversed(range(task.trajectory.steps)):
            hv, hm = fd_hvp(task, task.trajectory.iterates[k], v, self.delta, self.symmetric, others, pieces)
            lr = task.trajectory.lrs[k]
            mixed = {n: mixed[n] - lr * hm[n] for n in mixed}
            v = {n: v[n] - lr * hv[n] for n in v}
        # theta_K depends on theta with identity Jacobian (first-order trajectory), so the
        # query loss already contributes g; the zero-valued term turns g into v.  Parameters
        # that are not adapted get, beside their direct query gradient, the mixed terms
        # -sum_k a_k d/dphi <grad_theta L_S(theta_k, phi), v_{k+1}> (FOMAML drops them).
        loss = zero_valued(loss, params, {n: v[n] - g[n] for n in v})
        return zero_valued(loss, others, mixed) if others else loss
