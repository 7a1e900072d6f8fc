"""MAML++ (Antoniou et al., "How to train your MAML", ICLR 2019): the training fixes as one plugin.

- LSLR: a learnable inner learning rate per adapted parameter tensor and per inner step.
- MSL: the query loss after every inner step, weighted; the weights anneal linearly from
  uniform to "last step only" over ``msl_iters`` training iterations.
- DA: derivative-order annealing, first order for the first ``first_order_iters`` iterations.
Per-step BatchNorm statistics and weights (BNRS/BNWB) are not implemented (see the docs page).
"""

from __future__ import annotations

import torch
from torch import nn

from metaopt.builtin import query_loss
from metaopt.counter import IterationCounter
from metaopt.errors import ConfigError
from metaopt.hookspecs import hookimpl
from metaopt.plugins.meta_sgd import NO_INNER_STEP, key, relative_lr
from metaopt.task import Params, Task, Trajectory


class MAMLPlusPlus(IterationCounter):
    """MAML++: per-layer per-step learned inner rates, multi-step loss, derivative-order annealing."""

    name = "maml_pp"
    vmap_safe = True  # runs under engine="vmap" (tests/test_engine.py, tests/plugins/test_combinations.py)
    incompatible_with = NO_INNER_STEP

    def __init__(self, lslr: bool = True, msl: bool = True, msl_iters: int = 1000, first_order_iters: int = 0) -> None:
        if msl_iters < 0 or first_order_iters < 0:
            raise ConfigError(f"msl_iters={msl_iters} and first_order_iters={first_order_iters} must be >= 0.")
        self.lslr, self.msl = bool(lslr), bool(msl)
        self.msl_iters, self.first_order_iters = msl_iters, first_order_iters
        self.iteration = 0
        # the schedule's state for the current training batch, set in batch_start (see there)
        self._annealing, self._first_order = False, False
        self._progress = torch.zeros((), dtype=torch.float64)
        self.lrs: nn.ParameterDict | None = None
        self.rates: dict[str, nn.Parameter] = {}
        if not self.lslr:
            self.inner_step = None  # the default SGD step (or the learner's inner optimizer)
            self.plugin_modules = None

    @hookimpl
    def replay_safe(self, learner) -> bool:
        """inner_step reads the step's learned rates by ``trajectory.k``, which a replay restores."""
        return True

    @hookimpl
    def configure(self, learner) -> None:
        if self.lslr and (learner.inner_optimizer_name != "sgd" or learner.inner_optimizer_kwargs):
            raise ConfigError(
                f"maml_pp's learned rates (lslr) replace the inner SGD step; inner_optimizer="
                f"{learner.inner_optimizer_name!r} would be ignored. Use inner_optimizer='sgd' or maml_pp:lslr=false."
            )
        self.steps = max(learner.inner_steps, 1)

    @hookimpl
    def plugin_modules(self, learner) -> dict[str, nn.Module]:
        named = dict(learner.model.named_parameters())
        init = learner.lrs_for(self.steps)
        self.lrs = nn.ParameterDict()
        for name in learner.adapted_names:
            p = named[name]
            self.lrs[key(name)] = nn.Parameter(torch.tensor(init, dtype=p.dtype, device=p.device))
        self.rates = {name: self.lrs[key(name)] for name in learner.adapted_names}  # the same Parameters
        return {"maml_pp_lr": self.lrs}

    # -- schedule -------------------------------------------------------------------
    def msl_weights(self, steps: int) -> list[float]:
        """Weights of the query losses after steps 1..K (sum 1), annealed to the last step."""
        if not self.msl or steps <= 1:
            return [1.0] * min(steps, 1)
        s = self.schedule_progress()
        return [(1 - s) / steps] * (steps - 1) + [(1 - s) / steps + s]

    def schedule_progress(self) -> float:
        """How far the multi-step loss has annealed: 0 (uniform weights) to 1 (the last step only)."""
        return 1.0 if self.msl_iters == 0 else min(1.0, self.iteration / self.msl_iters)

    @hookimpl
    def batch_start(self, batch) -> None:
        # The task hooks read the schedule from here, never self.iteration: under engine="compile" a
        # Python value read in the compiled task body is guarded on, and the counter would recompile
        # the body every iteration.  The progress is a tensor (an input of the compiled graph); the
        # two flags change once each (one recompilation when each phase ends).
        if batch.training:
            self._annealing = self.msl and self.schedule_progress() < 1.0
            self._first_order = self.iteration < self.first_order_iters
            self._progress.fill_(self.schedule_progress())

    @hookimpl
    def task_start(self, task: Task) -> None:
        if task.training and self._first_order:
            task.second_order = False

    # -- the hooks ------------------------------------------------------------------
    @hookimpl
    def inner_step(self, task: Task, trajectory: Trajectory, params: Params, grads: Params) -> Params:
        k, scale = min(trajectory.k, self.steps - 1), relative_lr(task, trajectory)
        if not task.training:
            return {n: p - scale * self.rates[n][k].detach() * grads[n] for n, p in params.items()}
        return {n: p - scale * self.rates[n][k] * grads[n] for n, p in params.items()}

    @hookimpl
    def loss_modification(self, task: Task, params: Params, loss: torch.Tensor) -> dict[str, torch.Tensor] | None:
        trajectory = task.trajectory
        if trajectory is None or not self._annealing or trajectory.steps <= 1:
            return None
        # msl_weights(K) as tensors: (1 - s)/K for the steps before the last, (1 - s)/K + s for the last
        progress = self._progress.to(loss)
        w = (1.0 - progress) / trajectory.steps
        output, metrics = task.query_output, dict(task.metrics)
        term = (w + progress - 1.0) * loss
        for point in trajectory.iterates[1:-1]:
            term = term + w * query_loss(task, point)
        task.query_output = output  # query_loss sets them; keep the final step's
        task.metrics.update(metrics)
        return {"msl": term}
