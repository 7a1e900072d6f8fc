"""Issue 18's plugins against central finite differences of the meta-objective (float64).

The objective is evaluated by plain forward code (inner gradients by autograd, values only), so
the check does not reuse the second-order graph that the learner differentiates.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import class_tasks
from torch import nn
from torch.func import functional_call

from metaopt import HeadedModel, MetaLearner
from metaopt.plugins import ANIL, MAMLPlusPlus, MetaSGD

STEPS, LR = 2, 0.3


def _model():
    torch.manual_seed(0)
    return HeadedModel(nn.Sequential(nn.Linear(4, 6), nn.Tanh()), nn.Linear(6, 3)).double()


def _objective(model, params, rates, tasks, adapted, weights, per_step):
    """Mean over tasks of sum_k w_k L_Q(theta_k), steps theta - rate * g, by value."""
    total = 0.0
    for sx, sy, qx, qy in tasks:
        fast = dict(params)
        for k in range(STEPS):
            leaves = {n: fast[n].detach().requires_grad_() for n in adapted}
            loss = F.cross_entropy(functional_call(model, {**fast, **leaves}, (sx,)), sy)
            grads = torch.autograd.grad(loss, list(leaves.values()))
            for n, g in zip(adapted, grads):
                rate = LR if rates is None else (rates[n][k] if per_step else rates[n])
                fast[n] = fast[n] - rate * g
            if weights[k]:
                total += weights[k] * float(F.cross_entropy(functional_call(model, fast, (qx,)), qy))
    return total / len(tasks)


@pytest.mark.parametrize("name", ["anil", "meta_sgd", "maml_pp"])
def test_meta_gradient_matches_central_differences(name):
    model = _model()
    plugin = {"anil": ANIL(), "meta_sgd": MetaSGD(), "maml_pp": MAMLPlusPlus(msl_iters=10)}[name]
    learner = MetaLearner(model, [plugin], inner_steps=STEPS, inner_lr=LR)
    rates, per_step, weights = None, name == "maml_pp", [0.0] * (STEPS - 1) + [1.0]
    if name != "anil":
        module = learner.plugin_modules["meta_sgd_lr" if name == "meta_sgd" else "maml_pp_lr"]
        with torch.no_grad():
            for p in module.parameters():
                p.uniform_(0.1, 0.5, generator=torch.Generator().manual_seed(p.numel()))
        rates = {k.replace("__", "."): p for k, p in module.items()}
    if name == "maml_pp":
        plugin.iteration = 3
        weights = plugin.msl_weights(STEPS)
    tasks = class_tasks(2)
    learner.backward(tasks)
    leaves = list(learner.parameters())  # the model's and the learned rates
    grad = torch.cat([p.grad.flatten() for p in leaves])
    direction = torch.randn(grad.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    start = torch.nn.utils.parameters_to_vector(leaves).detach().clone()

    def at(h):
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(start + h * direction, leaves)
        params = {n: p.detach() for n, p in model.named_parameters()}
        detached = None if rates is None else {n: r.detach() for n, r in rates.items()}
        return _objective(model, params, detached, tasks, learner.adapted_names, weights, per_step)

    h = 1e-5
    fd = (at(h) - at(-h)) / (2 * h)
    analytic = float(grad @ direction)
    assert abs(fd - analytic) < 1e-7 * max(1.0, abs(analytic)), (name, fd, analytic)
