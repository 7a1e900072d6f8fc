from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import regression_tasks
from torch.func import functional_call

from metaopt import MetaLearner
from metaopt.models import mlp
from metaopt.plugins import MAMLPlusPlus

BACKENDS = ["higher", "torch.func"]
STEPS, LR = 3, 0.05


def _by_hand(model, rates, tasks, weights, second_order):
    """Mean over tasks of sum_k w_k L_Q(theta_k), LSLR steps theta - lr[name][k] g (first order if asked)."""
    params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    lrs = {n: r.detach().clone().requires_grad_() for n, r in rates.items()}
    total = 0
    for sx, sy, qx, qy in tasks:
        fast = dict(params)
        for k in range(STEPS):
            loss = F.mse_loss(functional_call(model, fast, (sx,)), sy)
            g = torch.autograd.grad(loss, list(fast.values()), create_graph=second_order)
            fast = {n: p - lrs[n][k] * (gi if second_order else gi.detach()) for (n, p), gi in zip(fast.items(), g)}
            total = total + weights[k] * F.mse_loss(functional_call(model, fast, (qx,)), qy)
    grads = torch.autograd.grad(total / len(tasks), [*params.values(), *lrs.values()])
    return dict(zip([*params, *["lr." + n for n in lrs]], grads))


@pytest.mark.parametrize("backend", BACKENDS)
def test_lslr_msl_and_derivative_order_annealing_equal_the_hand_computation(backend):
    torch.manual_seed(0)
    model = mlp(hidden=(16, 16)).double()
    plugin = MAMLPlusPlus(msl_iters=4, first_order_iters=1)
    learner = MetaLearner(model, [plugin], inner_steps=STEPS, inner_lr=LR, loss_fn=F.mse_loss, backend=backend)
    module = learner.plugin_modules["maml_pp_lr"]
    assert all(r.tolist() == [LR] * STEPS for r in module.values())  # per step, initialised from inner_lr
    with torch.no_grad():
        for r in module.values():
            r.uniform_(0.01, 0.1)
    rates = {k.replace("__", "."): r for k, r in module.items()}
    tasks = regression_tasks(2)
    for iteration, second_order in ((0, False), (1, True), (2, True)):  # first order for 1 iteration
        assert plugin.iteration == iteration
        weights = plugin.msl_weights(STEPS)
        s = iteration / 4
        assert weights == pytest.approx([(1 - s) / 3, (1 - s) / 3, (1 - s) / 3 + s])
        learner.zero_grad()
        result = learner.backward(tasks)
        expected = _by_hand(model, rates, tasks, weights, second_order)
        got = {**{n: p.grad for n, p in model.named_parameters()}, **{"lr." + n: r.grad for n, r in rates.items()}}
        for n, e in expected.items():
            assert (got[n] - e).abs().max() < 1e-10 * max(1.0, e.abs().max().item()), (iteration, n)
        assert "msl" in result.metrics
    assert plugin.msl_weights(STEPS) == pytest.approx([0.25 / 3, 0.25 / 3, 0.25 / 3 + 0.75])
    plugin.iteration = 4
    assert plugin.msl_weights(STEPS) == [0.0, 0.0, 1.0]  # annealed: the last step only, no extra term
    assert "msl" not in learner.backward(tasks).metrics
    assert learner.plugin_state()["maml_pp"] == {"iteration": 5}
