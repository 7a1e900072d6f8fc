"""HyperMAML (Przewiezlikowski et al., 2022): a hypernetwork generates the head's task update.

Only the classifier head is adapted.  Per support example the hypernetwork sees the backbone
embedding z, the softmax of the unadapted head on z (no gradient) and the one-hot label; a
class's examples are averaged over shots, and one MLP shared across classes maps each class
to its head-row and bias update.  Warm-up: pure MAML on the head, then a linear blend, then
the pure hypernetwork update (no inner backward pass at all).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from metaopt.builtin import gradient_adapt
from metaopt.counter import IterationCounter
from metaopt.errors import ConfigError
from metaopt.hookspecs import hookimpl
from metaopt.task import Params, Task, Trajectory

HEAD = ("head.weight", "head.bias")
#: evaluation: "auto" = the pure hypernetwork once training has left the MAML warm-up (the
#: authors' final test), pure MAML before; "schedule" = the training blend of this iteration;
#: "hyper" = always the hypernetwork
EVAL_MODES = ("auto", "schedule", "hyper")


def hypernetwork(in_dim: int, out_dim: int, hidden: int, layers: int) -> nn.Sequential:
    mods: list[nn.Module] = []
    width = in_dim
    for _ in range(layers - 1):
        mods += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    last = nn.Linear(width, out_dim)
    nn.init.zeros_(last.weight)  # start as "no update", so training begins at the meta-learned head
    nn.init.zeros_(last.bias)
    return nn.Sequential(*mods, last)


class HyperMAML(IterationCounter):
    """HyperMAML: a hypernetwork maps the support set to the head update (with a MAML warm-up)."""

    name = "hypermaml"
    vmap_safe = True  # runs under engine="vmap" (tests/test_engine.py, tests/plugins/test_combinations.py)
    incompatible_with = {
        "shot": "SHOT regularises an inner gradient trajectory, which HyperMAML does not have. Drop one of them: "
        "SHOT with MAML or another gradient-based learner, or HyperMAML without SHOT.",
        "reptile": "Reptile's meta-gradient (theta - theta_K) ignores the query loss, the only path by which the "
        "hypernetwork and the backbone get a gradient, so neither would ever train. Use HyperMAML alone "
        "(or with fomaml for a first-order warm-up).",
        "convergent_fo": "the convergent estimator walks back over plain SGD inner steps; the hypernetwork update "
        "is not one, so its estimate would be wrong (and it fails when the step counts differ). Use HyperMAML alone "
        "(or with fomaml for a first-order warm-up).",
    }

    def __init__(
        self,
        hidden: int = 256,
        layers: int = 3,
        warmup_iters: int = 0,
        blend_iters: int = 0,
        maml_steps: int = 5,
        maml_lr: float = 0.01,
        eval_mode: str = "auto",
    ) -> None:
        if eval_mode not in EVAL_MODES:
            raise ConfigError(f"eval_mode={eval_mode!r} must be one of {EVAL_MODES}.")
        if hidden < 1 or layers < 1 or warmup_iters < 0 or blend_iters < 0 or maml_steps < 0 or maml_lr <= 0:
            raise ConfigError(
                f"hypermaml options out of range: hidden={hidden}, layers={layers}, warmup_iters={warmup_iters}, "
                f"blend_iters={blend_iters}, maml_steps={maml_steps}, maml_lr={maml_lr}."
            )
        self.hidden, self.layers = hidden, layers
        self.warmup_iters, self.blend_iters = warmup_iters, blend_iters
        self.maml_steps, self.maml_lr = maml_steps, maml_lr
        self.eval_mode = eval_mode
        self.iteration = 0
        self.net: nn.Module | None = None
        # the blend weights of this batch (training, evaluation), set in batch_start: see there
        self._weights = {True: torch.ones((), dtype=torch.float64), False: torch.ones((), dtype=torch.float64)}
        self._parts = {True: (False, True), False: (False, True)}  # (maml part, hypernetwork part)

    # -- setup ----------------------------------------------------------------------
    @hookimpl
    def replay_safe(self, learner) -> str:
        return "HyperMAML replaces the inner loop (adapt) with a hypernetwork's update; there are no inner steps to recompute"

    @hookimpl
    def configure(self, learner) -> None:
        head = getattr(learner.model, "head", None)
        if not isinstance(head, nn.Linear):
            raise ConfigError(
                "hypermaml needs a model with a Linear `head` and forward(x, return_features=True); "
                "wrap yours as metaopt.HeadedModel(body, nn.Linear(dim, n_out))."
            )
        self.dim, self.n_out = head.in_features, head.out_features
        self.regression = head.out_features == 1
        extra = 2 if self.regression else 2 * self.n_out
        net = hypernetwork(self.dim + extra, self.dim + 1, self.hidden, self.layers)
        self.net = net.to(device=head.weight.device, dtype=head.weight.dtype)

    @hookimpl
    def adapted_params(self, learner, candidates: list[str]) -> list[str]:
        return [n for n in candidates if n in HEAD]

    @hookimpl
    def plugin_modules(self, learner) -> dict[str, nn.Module]:
        assert self.net is not None
        return {"hypernet": self.net}

    # -- schedule -------------------------------------------------------------------
    def blend(self) -> float:
        """Training weight of the hypernetwork update (0: pure MAML, 1: pure hypernetwork).

        Iterations ``0 .. warmup_iters-1`` are pure MAML, the next ``blend_iters`` blend with
        weights ``1/(b+1) .. b/(b+1)`` (strictly between 0 and 1), then pure hypernetwork.
        """
        if self.iteration < self.warmup_iters:
            return 0.0
        return min(1.0, (self.iteration - self.warmup_iters + 1) / (self.blend_iters + 1))

    def eval_blend(self) -> float:
        """Weight of the hypernetwork update at evaluation (see ``EVAL_MODES``)."""
        if self.eval_mode == "hyper":
            return 1.0
        if self.eval_mode == "schedule":
            return self.blend()
        return 0.0 if self.iteration < self.warmup_iters else 1.0

    @hookimpl
    def batch_start(self, batch) -> None:
        # adapt reads the blend from here, never self.iteration: under engine="compile" a Python value read
        # in the compiled task body is guarded on, and the counter would recompile it every iteration.  The
        # weight is a tensor (a graph input); which parts run changes once per phase.
        for training, w in ((True, self.blend()), (False, self.eval_blend())):
            self._weights[training].fill_(w)
            self._parts[training] = (w < 1.0, w > 0.0)

    # -- adaptation -----------------------------------------------------------------
    def hyper_update(self, task: Task, start: Params) -> Params:
        assert self.net is not None
        features, output = task.forward(task.support_x, start, return_features=True)
        if self.regression:
            summary = torch.cat([features, output.detach(), task.support_y], dim=1).mean(0, keepdim=True)
        else:
            onehot = F.one_hot(task.support_y, self.n_out).to(features.dtype)
            rows = torch.cat([features, F.softmax(output.detach(), dim=-1), onehot], dim=1)
            counts = onehot.sum(0).clamp(min=1).unsqueeze(1)
            summary = (onehot.T @ rows) / counts  # mean over each class's shots
        delta = self.net(summary)
        return {
            "head.weight": start["head.weight"] + delta[:, : self.dim],
            "head.bias": start["head.bias"] + delta[:, self.dim],
        }

    @hookimpl
    def adapt(self, task: Task, trajectory: Trajectory) -> Params:
        start = trajectory.iterates[0]
        if trajectory.steps == 0:  # "0 inner steps" (e.g. the unadapted baseline): no update at all
            return start
        use_maml, use_hyper = self._parts[task.training]
        maml_params = hyper_params = None
        if use_maml:
            maml = task.learner.new_trajectory(
                task, self.maml_steps, lr=self.maml_lr, start=start, main=trajectory.main
            )
            maml_params = gradient_adapt(task, maml)
        if use_hyper:
            hyper_params = self.hyper_update(task, start)
        if maml_params is None or hyper_params is None:
            params = maml_params if hyper_params is None else hyper_params
        else:
            w = self._weights[task.training].to(start["head.weight"])
            params = {n: (1.0 - w) * maml_params[n] + w * hyper_params[n] for n in start}
        trajectory.iterates.append(params)
        return params
