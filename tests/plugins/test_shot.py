from __future__ import annotations

import torch
import torch.nn.functional as F
from conftest import class_tasks, regression_tasks
from torch import nn

from metaopt import MetaLearner
from metaopt.models import mlp
from metaopt.plugins import SHOT
from metaopt.plugins.shot import output_distance


def test_term_is_zero_when_support_hessian_is_zero_along_the_path():
    # a linear model with a loss linear in its parameters: the support gradient is constant,
    # so K steps at alpha and one step at K*alpha land on the same point
    model = nn.Linear(4, 3).double()
    learner = MetaLearner(
        model, [SHOT(weight=1.0, form="big_step")], inner_steps=3, inner_lr=0.1, loss_fn=lambda out, y: out[:, 0].mean()
    )
    result = learner.forward(class_tasks())
    assert abs(result.metrics["shot"]) < 1e-12


def test_term_is_positive_on_a_nonlinear_model():
    torch.manual_seed(0)
    model = mlp(num_classes=3, in_features=4).double()
    result = MetaLearner(model, [SHOT(weight=1.0)], inner_steps=3, inner_lr=0.5).forward(class_tasks())
    assert result.metrics["shot"] > 1e-6


def _by_hand(model, task, steps, lr, form):
    """Independent SHOT term with torch.func (weight 1, KL)."""
    sx, sy, qx, qy = task
    params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}

    def run(start, k, step_lr, graph):
        fast = dict(start)
        for _ in range(k):
            loss = F.cross_entropy(torch.func.functional_call(model, fast, (sx,)), sy)
            g = torch.autograd.grad(loss, list(fast.values()), create_graph=graph)
            fast = {n: p - step_lr * gi for (n, p), gi in zip(fast.items(), g)}
        return torch.func.functional_call(model, fast, (qx,))

    main = run(params, steps, lr, True)
    if form == "big_step":
        term = output_distance(main.detach(), run(params, 1, steps * lr, True), "kl", False)
    else:
        detached = {n: p.detach().requires_grad_() for n, p in params.items()}
        term = output_distance(run(detached, 2 * steps, lr / 2, False).detach(), main, "kl", False)
    return term, dict(zip(params, torch.autograd.grad(term, list(params.values()))))


def test_gradient_flows_only_through_the_non_detached_branch():
    for steps, form in ((3, "big_step"), (1, "more_steps")):
        torch.manual_seed(0)
        model = mlp(num_classes=3, in_features=4).double()
        tasks = class_tasks(1)
        model.zero_grad()
        MetaLearner(model, [SHOT(weight=1.0)], inner_steps=steps, inner_lr=0.5).backward(tasks)
        with_shot = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad()
        MetaLearner(model, inner_steps=steps, inner_lr=0.5).backward(tasks)
        term, expected = _by_hand(model, tasks[0], steps, 0.5, form)
        assert term.item() > 0
        for n, p in model.named_parameters():
            assert (with_shot[n] - p.grad - expected[n]).abs().max() < 1e-10, (steps, n)


def test_k1_uses_the_reference_steps_rule_and_big_step_would_be_zero():
    shot = SHOT()
    assert shot.resolved_form(1) == "more_steps" and shot.resolved_form(3) == "big_step"
    torch.manual_seed(0)
    model = mlp(num_classes=3, in_features=4).double()
    result = MetaLearner(model, [SHOT(weight=1.0)], inner_steps=1, inner_lr=0.5).forward(class_tasks(1))
    term, _ = _by_hand(model, class_tasks(1)[0], 1, 0.5, "more_steps")
    assert abs(result.metrics["shot"] - term.item()) < 1e-10


def test_not_applied_at_evaluation_and_regression_uses_mse():
    model = mlp().double()
    learner = MetaLearner(model, [SHOT(weight=1.0)], inner_steps=2, inner_lr=0.01, loss_fn=F.mse_loss)
    assert "shot" not in learner.evaluate(regression_tasks(2)).metrics
    assert learner.forward(regression_tasks(2)).metrics["shot"] > 0
