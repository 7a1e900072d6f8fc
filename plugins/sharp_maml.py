"""Sharp-MAML: sharpness-aware MAML (Abbas et al., ICML 2022), inner, outer or both.

Inner SAM (radius rho_inner): the step from theta_k uses grad L_S(theta_k + eps_k),
eps_k = rho * g_k / |g_k|.  Outer SAM (radius rho_outer): the meta-gradient G at theta gives
theta + rho * G / |G|; the whole meta-loss is recomputed there (inner loops re-run on the
same batch), its gradient is kept, and theta is restored bit for bit.
"""

from __future__ import annotations

import torch

from metaopt.errors import ConfigError, PluginConflictError
from metaopt.hookspecs import hookimpl
from metaopt.task import Batch, Params, Task, global_norm

EPS = 1e-12
DEFAULT_RHO = 0.05


class SharpMAML:
    """Sharp-MAML: SAM in the inner loop (rho_inner), the outer loop (rho_outer), or both.

    A radius that is not given is off: ``rho_inner`` alone is "inner", ``rho_outer`` alone is
    "outer", both is "both"; with neither, "inner" at 0.05 (the authors' radius).
    """

    name = "sharp_maml"
    vmap_safe = True  # runs under engine="vmap" (tests/test_engine.py, tests/plugins/test_combinations.py)

    def __init__(
        self,
        rho_inner: float | None = None,
        rho_outer: float | None = None,
        differentiate_epsilon: bool = False,
        at_eval: bool = False,
    ) -> None:
        if rho_inner is None and rho_outer is None:
            rho_inner = DEFAULT_RHO  # neither radius given: inner SAM at the authors' radius
        rho_inner, rho_outer = float(rho_inner or 0.0), float(rho_outer or 0.0)
        if rho_inner < 0 or rho_outer < 0:
            raise ConfigError(f"rho_inner={rho_inner} and rho_outer={rho_outer} must be >= 0.")
        if rho_inner == 0 and rho_outer == 0:
            raise ConfigError(
                "sharp_maml with rho_inner=0 and rho_outer=0 is plain MAML. Set rho_inner (inner SAM), rho_outer "
                f"(outer SAM) or both, e.g. sharp_maml:rho_outer={DEFAULT_RHO} (the authors' radius)."
            )
        self.rho_inner, self.rho_outer = rho_inner, rho_outer
        self.differentiate_epsilon, self.at_eval = differentiate_epsilon, at_eval
        # a radius of 0 hides its hook, so that path does not run at all (no wasted loss
        # evaluations; the default outer step then backpropagates task by task)
        if rho_inner == 0:
            self.inner_grad = None
        if rho_outer == 0:
            self.outer_step = None

    @property
    def mode(self) -> str:
        """``"inner"``, ``"outer"`` or ``"both"``: which radii are on."""
        return "both" if self.rho_inner and self.rho_outer else ("inner" if self.rho_inner else "outer")

    @hookimpl
    def replay_safe(self, learner) -> bool:
        """The inner perturbation is a pure function of the parameters (two support gradients)."""
        return True

    @hookimpl
    def configure(self, learner) -> None:
        if self.rho_inner > 0 and learner.get_plugin("hypermaml") is not None:
            raise PluginConflictError(
                "plugins 'sharp_maml' and 'hypermaml' cannot be combined with rho_inner > 0: HyperMAML has no "
                "inner gradient step to perturb. Use sharp_maml with rho_inner=0 and rho_outer > 0 instead."
            )

    def perturbation(self, grads: Params) -> Params:
        norm = global_norm(grads)
        return {n: self.rho_inner * g / (norm + EPS) for n, g in grads.items()}

    @hookimpl
    def inner_grad(self, task: Task, params: Params) -> Params | None:
        if not task.training and not self.at_eval:
            return None
        keep = task.create_graph and self.differentiate_epsilon
        eps = self.perturbation(task.inner_grad_at(params, create_graph=keep))
        if not keep:
            eps = {n: e.detach() for n, e in eps.items()}
        perturbed = {n: params[n] + eps[n] for n in params}
        return task.grad(task.support_loss, perturbed)

    @hookimpl
    def outer_step(self, batch: Batch) -> bool:
        params = list(batch.learner.meta_parameters())
        earlier = [p.grad for p in params]
        for p in params:
            p.grad = None
        assert batch.meta_loss is not None
        batch.backward(batch.meta_loss)
        batch.learner.sync_gradients()  # every process perturbs along the same (whole-batch) G
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
        scale = self.rho_outer / (global_norm(grads) + EPS)
        originals = [p.detach().clone() for p in params]
        tasks, meta_loss = batch.tasks, batch.meta_loss
        try:
            with torch.no_grad():
                for p, g in zip(params, grads):
                    p.add_(g * scale)
                    p.grad = None
            perturbed_loss = batch.rerun()
            batch.backward(perturbed_loss)
        finally:
            with torch.no_grad():
                for p, original in zip(params, originals):
                    p.copy_(original)
        for task, rerun in zip(tasks, batch.tasks):
            task.metrics["sam_outer_loss"] = rerun.loss.detach()
        batch.tasks, batch.meta_loss = tasks, meta_loss
        for p, before in zip(params, earlier):
            if before is not None:
                p.grad = before if p.grad is None else before + p.grad
        return True
