from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import regression_tasks
from torch.func import functional_call

from metaopt import MetaLearner
from metaopt.errors import ConfigError
from metaopt.models import mlp
from metaopt.plugins import MetaSGD

BACKENDS = ["higher", "torch.func"]


def _by_hand(model, alphas, tasks, steps, scalar):
    """Mean query loss after Meta-SGD steps theta - alpha (.) g, differentiated w.r.t. theta and alpha."""
    params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    alpha = {n: a.detach().clone().requires_grad_() for n, a in alphas.items()}
    total = 0
    for sx, sy, qx, qy in tasks:
        fast = dict(params)
        for _ in range(steps):
            g = torch.autograd.grad(
                F.mse_loss(functional_call(model, fast, (sx,)), sy), list(fast.values()), create_graph=True
            )
            fast = {n: p - alpha[n] * gi for (n, p), gi in zip(fast.items(), g)}
        total = total + F.mse_loss(functional_call(model, fast, (qx,)), qy)
    grads = torch.autograd.grad(total / len(tasks), [*params.values(), *alpha.values()])
    return dict(zip([*params, *["lr." + n for n in alpha]], grads))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("per_element", [True, False])
def test_meta_sgd_gradients_of_theta_and_alpha_equal_the_hand_computation(backend, per_element):
    torch.manual_seed(0)
    model = mlp(hidden=(16, 16)).double()
    plugin = MetaSGD(per_element=per_element)
    learner = MetaLearner(model, [plugin], inner_steps=2, inner_lr=0.05, loss_fn=F.mse_loss, backend=backend)
    rates = learner.plugin_modules["meta_sgd_lr"]
    assert all(torch.all(a == 0.05) for a in rates.values())  # initialised from inner_lr
    with torch.no_grad():
        for a in rates.values():
            a.uniform_(0.01, 0.1)
    alphas = {k.replace("__", "."): a for k, a in rates.items()}
    assert all(a.shape == (model.get_parameter(n).shape if per_element else ()) for n, a in alphas.items())
    tasks = regression_tasks(2)
    learner.backward(tasks)
    expected = _by_hand(model, alphas, tasks, 2, not per_element)
    got = {**{n: p.grad for n, p in model.named_parameters()}, **{"lr." + n: a.grad for n, a in alphas.items()}}
    for n, e in expected.items():
        assert (got[n] - e).abs().max() < 1e-10 * max(1.0, e.abs().max().item()), n


def test_learned_rates_are_meta_parameters_checkpointed_and_not_graphed_at_evaluation():
    model = mlp().double()
    learner = MetaLearner(model, [MetaSGD()], inner_steps=1, inner_lr=0.05, loss_fn=F.mse_loss)
    rates = set(map(id, learner.plugin_modules["meta_sgd_lr"].parameters()))
    assert rates <= set(map(id, learner.parameters()))
    assert any(k.startswith("plugin_modules.meta_sgd_lr.") for k in learner.state_dict())
    learner.evaluate(regression_tasks(2))
    assert all(a.grad is None for a in learner.plugin_modules["meta_sgd_lr"].parameters())
    with pytest.raises(ConfigError, match="inner_optimizer='sgd'"):
        MetaLearner(mlp(), [MetaSGD()], inner_optimizer="adam")
