"""The differentiable inner step: plain SGD's fused form against the textbook update."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import image_tasks
from reference import maml_meta_grad

from metaopt import MetaLearner
from metaopt.inner_optim import diff_step, fresh_state, make_template
from metaopt.models import conv4


def test_plain_sgd_step_matches_the_update_and_its_second_order_gradient():
    torch.manual_seed(0)
    p = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 2, dtype=torch.float64)
    grad = torch.autograd.grad((w * p**3).sum(), p, create_graph=True)[0]
    for lr in (0.3, torch.tensor(0.3, dtype=torch.float64)):  # a float and a tensor learning rate
        (new,) = diff_step(None, [p], [grad], lr)
        expected = p - 0.3 * grad
        torch.testing.assert_close(new, expected, rtol=0, atol=1e-15)
        # d/dp sum(new^2) flows through the gradient too (second order)
        got = torch.autograd.grad((new**2).sum(), p, retain_graph=True)[0]
        want = torch.autograd.grad((expected**2).sum(), p, retain_graph=True)[0]
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_a_parameter_without_gradient_is_returned_unchanged():
    p = torch.ones(2, requires_grad=True)
    (new,) = diff_step(None, [p], [None], 0.1)
    assert new is p


def test_fused_float32_step_is_as_accurate_as_the_textbook_loop():
    """Five second-order steps in float32 drift from the float64 answer by float rounding times the
    conditioning; the fused step must drift no more than the textbook ``p - lr * g`` loop does."""
    torch.manual_seed(0)
    model = conv4(num_classes=5, hidden=16)
    tasks64 = image_tasks(2, query=3, seed=1)
    tasks32 = [tuple(t.float() if t.is_floating_point() else t for t in task) for task in tasks64]
    exact = maml_meta_grad(copy.deepcopy(model).double(), tasks64, 5, 0.1, F.cross_entropy)
    largest = max(g.abs().max().item() for g in exact.values())

    def error(grads):
        return max((grads[n].double() - exact[n]).abs().max().item() for n in exact) / largest

    textbook = error(maml_meta_grad(model, tasks32, 5, 0.1, F.cross_entropy))
    MetaLearner(model, inner_steps=5, inner_lr=0.1).backward(tasks32)
    fused = error({n: p.grad for n, p in model.named_parameters()})
    assert 0 < textbook < 1e-3  # float32 really differs from float64, and only by rounding
    assert fused <= 2 * textbook, (fused, textbook)


ADAM_OPTIONS = [
    {},
    {"eps": 1e-3},
    {"weight_decay": 0.1},
    {"amsgrad": True},
    {"weight_decay": 0.1, "decoupled_weight_decay": True},
]


def _adam_both_ways(name, options, steps):
    """Parameters after ``steps`` updates of torch.optim.Adam and of metaopt's inner optimizer ``name``."""
    g = torch.Generator().manual_seed(0)
    start = [torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)]
    grads = [[torch.randn(p.shape, generator=g, dtype=torch.float64) for p in start] for _ in range(steps)]
    ref = [p.clone().requires_grad_() for p in start]
    torch_adam = torch.optim.Adam(ref, lr=0.01, **options)
    clones = [p.clone() for p in start]
    state = fresh_state(make_template(name, clones, **options), clones)
    ours = list(start)
    for step_grads in grads:
        for r, gr in zip(ref, step_grads):
            r.grad = gr.clone()
        torch_adam.step()
        ours = diff_step(state, ours, step_grads, 0.01)
    return [r.detach() for r in ref], ours


@pytest.mark.parametrize("options", ADAM_OPTIONS, ids=str)
def test_inner_adam_is_torch_adam_on_one_and_several_steps(options):
    for steps in (1, 4):
        ref, ours = _adam_both_ways("adam", options, steps)
        for r, o in zip(ref, ours):
            torch.testing.assert_close(o, r, rtol=0, atol=1e-15)


def test_higher_adam_is_kept_under_its_own_name_and_differs_from_torch_adam():
    ref, ours = _adam_both_ways("higher_adam", {"eps": 1e-3}, 1)
    assert max((r - o).abs().max().item() for r, o in zip(ref, ours)) > 1e-3  # eps added before the bias correction


def test_inner_adam_meta_gradient_matches_finite_differences_of_torch_adam():
    """The meta-gradient through 2 exact-Adam inner steps against central differences of a plain
    torch.optim.Adam inner loop (float64), with a parameter whose gradient is exactly 0 (no NaN)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1), torch.nn.Linear(1, 1))
    model = model.double()
    with torch.no_grad():
        model[3].weight.zero_()  # the gradient of layer 2's parameters is exactly 0 at the start
    g = torch.Generator().manual_seed(1)
    task = [torch.randn(8, 2, generator=g, dtype=torch.float64), torch.randn(8, 1, generator=g, dtype=torch.float64)]
    task += [torch.randn(8, 2, generator=g, dtype=torch.float64), torch.randn(8, 1, generator=g, dtype=torch.float64)]
    learner = MetaLearner(model, inner_steps=2, inner_lr=0.05, loss_fn=F.mse_loss, inner_optimizer="adam")
    learner.backward([task])
    meta = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert torch.isfinite(meta).all()

    def query_loss_after_torch_adam(theta):
        clone = copy.deepcopy(model)
        torch.nn.utils.vector_to_parameters(theta, clone.parameters())
        opt = torch.optim.Adam(clone.parameters(), lr=0.05)
        for _ in range(2):
            opt.zero_grad()
            F.mse_loss(clone(task[0]), task[1]).backward()
            opt.step()
        with torch.no_grad():
            return F.mse_loss(clone(task[2]), task[3]).item()

    theta = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    direction = torch.randn(theta.shape, generator=g, dtype=torch.float64)
    direction[-2] = 0  # moving the last weight off 0 turns layer 2's zero gradients on, where g/sqrt(v) jumps
    h = 1e-6
    fd = (query_loss_after_torch_adam(theta + h * direction) - query_loss_after_torch_adam(theta - h * direction)) / (
        2 * h
    )
    assert abs(fd - float(meta @ direction)) < 1e-6 * max(1.0, abs(fd)), (fd, float(meta @ direction))
