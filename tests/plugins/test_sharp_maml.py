from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import regression_tasks
from reference import maml_meta_grad

from metaopt import MetaLearner, hookimpl
from metaopt.errors import ConfigError, PluginHookError
from metaopt.models import mlp
from metaopt.plugins import SharpMAML


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


class GradSpy:
    name = "grad_spy"

    def __init__(self):
        self.seen = []

    @hookimpl(wrapper=True)
    def inner_grad(self, task, params):
        grads = yield
        self.seen.append(
            (
                {n: p.detach().clone() for n, p in params.items()},
                {n: g.detach() for n, g in grads.items()},
                task.support_x,
                task.support_y,
            )
        )
        return grads


class CountSupportLosses:
    name = "count_support_losses"

    def __init__(self):
        self.calls = 0

    @hookimpl(wrapper=True)
    def inner_loss(self, task, params):
        self.calls += 1
        return (yield)


def test_radii_that_are_not_given_are_off():
    assert (SharpMAML().rho_inner, SharpMAML().rho_outer, SharpMAML().mode) == (0.05, 0.0, "inner")
    outer = SharpMAML(rho_outer=0.05)
    assert (outer.rho_inner, outer.rho_outer, outer.mode) == (0.0, 0.05, "outer")
    assert SharpMAML(rho_inner=0.01, rho_outer=0.02).mode == "both"
    with pytest.raises(ConfigError, match="plain MAML"):
        SharpMAML(rho_inner=0.0, rho_outer=0.0)


def test_outer_only_runs_no_inner_sam_path():
    """2 tasks x 2 inner steps, outer SAM re-runs them once: 8 support losses, as for MAML twice."""
    counter = CountSupportLosses()
    learner = MetaLearner(
        mlp().double(), [counter, SharpMAML(rho_outer=0.05)], inner_steps=2, inner_lr=0.05, loss_fn=F.mse_loss
    )
    learner.backward(regression_tasks(2))
    assert counter.calls == 8


def test_inner_gradient_is_taken_at_the_perturbed_point():
    torch.manual_seed(0)
    model = mlp().double()
    spy = GradSpy()
    rho = 0.05
    MetaLearner(model, [spy, SharpMAML(rho_inner=rho)], inner_steps=3, inner_lr=0.05, loss_fn=F.mse_loss).backward(
        regression_tasks(1)
    )
    assert len(spy.seen) == 3
    for params, used, sx, sy in spy.seen:
        p = {n: t.clone().requires_grad_() for n, t in params.items()}
        g = torch.autograd.grad(F.mse_loss(torch.func.functional_call(model, p, (sx,)), sy), list(p.values()))
        norm = torch.sqrt(sum((gi**2).sum() for gi in g))
        shifted = {n: (t + rho * gi / norm).requires_grad_() for (n, t), gi in zip(p.items(), g)}
        out = F.mse_loss(torch.func.functional_call(model, shifted, (sx,)), sy)
        expected = torch.autograd.grad(out, list(shifted.values()))
        for (n, u), e in zip(used.items(), expected):
            assert (u - e).abs().max() < 1e-12, n


def test_outer_sam_restores_theta_bitwise_and_leaves_gradient_at_perturbed_point():
    torch.manual_seed(0)
    model = mlp().double()
    tasks = regression_tasks(2)
    rho = 0.1
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    MetaLearner(model, [SharpMAML(rho_outer=rho)], inner_steps=2, inner_lr=0.05, loss_fn=F.mse_loss).backward(tasks)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    got = _grads(model)
    g = maml_meta_grad(model, tasks, 2, 0.05, F.mse_loss)
    norm = torch.sqrt(sum((v**2).sum() for v in g.values()))
    shifted = mlp().double()
    shifted.load_state_dict({n: before[n] + rho * g[n] / norm for n in before})
    expected = maml_meta_grad(shifted, tasks, 2, 0.05, F.mse_loss)
    assert max((got[n] - expected[n]).abs().max().item() for n in got) < 1e-10
    assert max((got[n] - g[n]).abs().max().item() for n in got) > 1e-6  # it is not the plain gradient


def test_a_plugin_failing_inside_the_rerun_leaves_theta_exactly():
    class FailOnRerun:
        name = "fail_on_rerun"
        calls = 0

        @hookimpl
        def task_start(self, task):
            FailOnRerun.calls += 1
            if FailOnRerun.calls > 2:  # 2 tasks in the first pass, then the rerun starts
                raise RuntimeError("boom")

    model = mlp().double()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    learner = MetaLearner(
        model,
        [SharpMAML(rho_outer=0.5), FailOnRerun()],
        inner_steps=1,
        inner_lr=0.05,
        loss_fn=F.mse_loss,
    )
    with pytest.raises(PluginHookError, match="'fail_on_rerun' raised in hook 'task_start' \\(task 0\\).*boom") as info:
        learner.backward(regression_tasks(2))
    assert isinstance(info.value.__cause__, RuntimeError)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


@pytest.mark.parametrize("engine", ["loop", "vmap"])
def test_the_meta_loss_api_refuses_outer_sam_instead_of_returning_plain_mamls_gradient(engine):
    """learner(tasks).loss.backward() ran no outer SAM: plain MAML's meta-gradient, 20% off, without a word."""
    torch.manual_seed(0)
    learner = MetaLearner(mlp().double(), [SharpMAML(rho_outer=0.05)], loss_fn=F.mse_loss, engine=engine)
    with pytest.raises(ConfigError, match=r"'sharp_maml' replaces the outer step.*Use learner.backward\(tasks\)"):
        learner(regression_tasks(2))
    inner_only = MetaLearner(mlp().double(), [SharpMAML(rho_inner=0.05)], loss_fn=F.mse_loss, engine=engine)
    inner_only(regression_tasks(2)).loss.backward()  # inner SAM lives in the inner loop: the loss is the whole story
    assert all(p.grad is not None for p in inner_only.model.parameters())
