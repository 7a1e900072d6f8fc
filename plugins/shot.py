"""SHOT: suppress the Hessian along the inner trajectory (Lee et al., NeurIPS 2023, arXiv 2310.02751).

Two inner trajectories from the same start with the same total step length end at the same
point when the support-loss Hessian along the path is zero; their disagreement on the query
inputs, in output space, is added to the outer loss.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from metaopt.errors import ConfigError
from metaopt.hookspecs import hookimpl
from metaopt.task import Params, Task

FORMS = ("auto", "big_step", "more_steps")
DISTANCES = ("kl", "ce", "l2")


def output_distance(target: torch.Tensor, output: torch.Tensor, distance: str, regression: bool) -> torch.Tensor:
    """Distance from a fixed ``target`` to ``output`` (logits, or predictions for regression)."""
    if regression:
        return F.mse_loss(output, target)
    p_log = F.log_softmax(target, dim=-1)
    q_log = F.log_softmax(output, dim=-1)
    if distance == "kl":
        return (p_log.exp() * (p_log - q_log)).sum(-1).mean()
    if distance == "ce":
        return -(p_log.exp() * q_log).sum(-1).mean()
    return (p_log.exp() - q_log.exp()).pow(2).sum(-1).mean()


class SHOT:
    """SHOT: penalise disagreement of a cheaper/finer inner trajectory with the normal one."""

    name = "shot"
    vmap_safe = True  # runs under engine="vmap" (tests/test_engine.py, tests/plugins/test_combinations.py)
    incompatible_with = {
        "hypermaml": "HyperMAML has no inner gradient trajectory to regularise; use SHOT with a gradient-based learner."
    }

    def __init__(self, weight: float = 0.1, form: str = "auto", distance: str = "kl", substeps: int = 2) -> None:
        if weight < 0:
            raise ConfigError(f"weight={weight} must be >= 0.")
        if form not in FORMS:
            raise ConfigError(f"form={form!r} must be one of {FORMS}.")
        if distance not in DISTANCES:
            raise ConfigError(f"distance={distance!r} must be one of {DISTANCES}.")
        if substeps < 2:
            raise ConfigError(f"substeps={substeps} must be >= 2.")
        self.weight, self.form, self.distance, self.substeps = weight, form, distance, substeps

    @hookimpl
    def configure(self, learner) -> None:
        first_order = learner.first_order or any(getattr(p, "forces_first_order", False) for p in learner.plugins)
        if first_order:
            warnings.warn(
                "shot with a first-order learner: the penalty's gradient through the extra trajectory "
                "loses its second-order part.",
                stacklevel=2,
            )

    def resolved_form(self, steps: int) -> str:
        if self.form == "auto":
            return "more_steps" if steps == 1 else "big_step"
        if self.form == "big_step" and steps == 1:
            return "more_steps"  # with K=1 the one big step is the trajectory itself (term == 0)
        return self.form

    @hookimpl
    def loss_modification(self, task: Task, params: Params, loss: torch.Tensor) -> dict[str, torch.Tensor] | None:
        trajectory = task.trajectory
        if trajectory is None or trajectory.steps == 0 or self.weight == 0:
            return None
        regression = task.query_y.is_floating_point()
        main_out = task.query_output if task.query_output is not None else task.forward(task.query_x, params)
        if self.resolved_form(trajectory.steps) == "big_step":
            big, _ = task.adapt(steps=1, lr=[sum(trajectory.lrs)])
            target, output = main_out.detach(), task.forward(task.query_x, big)
        else:
            fine_lrs = [lr / self.substeps for lr in trajectory.lrs for _ in range(self.substeps)]
            detached = task.detached(task.start)
            second_order, task.second_order = task.second_order, False
            try:
                fine, _ = task.adapt(steps=len(fine_lrs), lr=fine_lrs, start=detached)
            finally:
                task.second_order = second_order
            with torch.no_grad():
                target = task.forward(task.query_x, fine)
            output = main_out
        return {"shot": self.weight * output_distance(target.detach(), output, self.distance, regression)}
