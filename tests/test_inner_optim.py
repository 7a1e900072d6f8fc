"""The differentiable inner step: plain SGD's fused form against the textbook update."""

from __future__ import annotations

import torch

from metaopt.inner_optim import diff_step


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
