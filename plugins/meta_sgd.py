"""Meta-SGD (Li et al., 2017, arXiv 1707.09835): a learnable inner learning rate per parameter.

theta_{k+1} = theta_k - alpha (.) grad L_S(theta_k), with alpha a tensor of theta's shape (or
one scalar per tensor), initialised from ``inner_lr`` and meta-learned with theta through
the query loss.  The alphas are a plugin-owned module, so they are meta-parameters: in
``learner.parameters()`` (the optimizer), ``state_dict`` (checkpoints), the multi-process
gradient average and ``accelerator.prepare``.
"""

from __future__ import annotations

import torch
from torch import nn

from metaopt.errors import ConfigError
from metaopt.hookspecs import hookimpl
from metaopt.task import Params, Task, Trajectory

NO_INNER_STEP = {
    "reptile": "Reptile's meta-gradient ignores the query loss, so the learned inner learning rates would never "
    "train; use fomaml for a first-order learner.",
    "convergent_fo": "the convergent estimator assumes plain SGD steps with one scalar learning rate; use fomaml "
    "or second-order MAML.",
    "hypermaml": "HyperMAML takes no inner gradient steps to scale; use one of them.",
}


def key(name: str) -> str:
    """A parameter name as a module key (dots are not allowed there)."""
    return name.replace(".", "__")


def relative_lr(task: Task, trajectory: Trajectory) -> float:
    """This step's learning rate relative to the learner's ``inner_lr`` for the same step.

    1 on the main trajectory; other plugins' extra trajectories (SHOT's one big step of K*alpha,
    its finer steps of alpha/2) scale the learned rates by the same factor.
    """
    base = task.learner.inner_lrs
    return trajectory.lr / base[min(trajectory.k, len(base) - 1)]


class MetaSGD:
    """Meta-SGD: one learnable inner learning-rate tensor per adapted parameter."""

    name = "meta_sgd"
    vmap_safe = True  # runs under engine="vmap" (tests/test_engine.py, tests/plugins/test_combinations.py)
    incompatible_with = NO_INNER_STEP

    def __init__(self, per_element: bool = True, init: float | None = None) -> None:
        if init is not None and init <= 0:
            raise ConfigError(f"init={init} must be > 0 (or None for the learner's inner_lr).")
        self.per_element, self.init = bool(per_element), init
        self.alpha: nn.ParameterDict | None = None
        self.rates: dict[str, nn.Parameter] = {}

    @hookimpl
    def replay_safe(self, learner) -> bool:
        """inner_step is a pure function of the parameters, the gradients and the learned rates."""
        return True

    @hookimpl
    def configure(self, learner) -> None:
        if learner.inner_optimizer_name != "sgd" or learner.inner_optimizer_kwargs:
            raise ConfigError(
                f"meta_sgd replaces the inner SGD step; inner_optimizer={learner.inner_optimizer_name!r} with "
                f"{learner.inner_optimizer_kwargs} would be ignored. Use inner_optimizer='sgd' without options."
            )

    @hookimpl
    def plugin_modules(self, learner) -> dict[str, nn.Module]:
        init = self.init if self.init is not None else learner.inner_lrs[0]
        named = dict(learner.model.named_parameters())
        self.alpha = nn.ParameterDict()
        for name in learner.adapted_names:
            p = named[name]
            shape = p.shape if self.per_element else ()
            self.alpha[key(name)] = nn.Parameter(torch.full(shape, float(init), dtype=p.dtype, device=p.device))
        # by parameter name, the same Parameter objects (.to() and load_state_dict keep them)
        self.rates = {name: self.alpha[key(name)] for name in learner.adapted_names}
        return {"meta_sgd_lr": self.alpha}

    @hookimpl
    def inner_step(self, task: Task, trajectory: Trajectory, params: Params, grads: Params) -> Params:
        scale = relative_lr(task, trajectory)
        rates = self.rates
        if not task.training:
            return {n: p - (scale * rates[n].detach()) * grads[n] for n, p in params.items()}
        return {n: p - (scale * rates[n]) * grads[n] for n, p in params.items()}
