"""The differentiable inner step: plain SGD's fused form against the textbook update."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from conftest import image_tasks
from reference import maml_meta_grad

from metaopt import MetaLearner
from metaopt.inner_optim import diff_step
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
