from __future__ import annotations

import torch
import torch.nn.functional as F
from conftest import regression_tasks
from reference import maml_meta_grad

from metaopt import MetaLearner
from metaopt.models import mlp
from metaopt.optim import NormalizedSGD
from metaopt.plugins import FOMAML, ConvergentFO, Reptile


def _flat(model):
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def _meta_grad(model, plugin, tasks, steps, lr):
    model.zero_grad()
    MetaLearner(model, [plugin] if plugin else [], inner_steps=steps, inner_lr=lr, loss_fn=F.mse_loss).backward(tasks)
    return _flat(model)


def _errors(steps):
    torch.manual_seed(0)
    model = mlp(hidden=(16, 16)).double()
    tasks = regression_tasks(2, shots=8)
    exact = torch.cat([g.flatten() for g in maml_meta_grad(model, tasks, steps, 0.05, F.mse_loss).values()])
    out = {}
    for delta in (1e-2, 1e-3, 1e-4):
        for est in ("symmetric", "forward"):
            g = _meta_grad(model, ConvergentFO(delta=delta, estimator=est), tasks, steps, 0.05)
            out[(delta, est)] = ((g - exact).norm() / exact.norm()).item(), F.cosine_similarity(g, exact, 0).item()
    fo = _meta_grad(model, FOMAML(), tasks, steps, 0.05)
    out["fomaml"] = ((fo - exact).norm() / exact.norm()).item(), F.cosine_similarity(fo, exact, 0).item()
    return out


def test_convergent_fo_approaches_exact_meta_gradient_k1_and_k3():
    for steps in (1, 3):
        err = _errors(steps)
        assert err[(1e-3, "symmetric")][1] > 0.999, (steps, err)
        # error shrinks with delta; the symmetric estimator beats the forward one
        assert err[(1e-4, "symmetric")][0] < err[(1e-2, "symmetric")][0]
        assert err[(1e-4, "forward")][0] < err[(1e-2, "forward")][0]
        for delta in (1e-2, 1e-3):
            assert err[(delta, "symmetric")][0] < err[(delta, "forward")][0], (steps, delta, err)
        # FOMAML's bias is visibly larger
        assert err["fomaml"][0] > 10 * err[(1e-3, "symmetric")][0], (steps, err)


def test_reptile_gradient_is_start_minus_adapted_over_total_lr():
    torch.manual_seed(1)
    model = mlp().double()
    tasks = regression_tasks(1)
    learner = MetaLearner(model, [Reptile()], inner_steps=3, inner_lr=0.02, loss_fn=F.mse_loss)
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    adapted = learner.adapt(tasks[0], steps=3)
    learner.backward(tasks)
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, (theta[n] - adapted[n]) / 0.06, atol=1e-12)


def test_normalized_sgd_steps_have_fixed_norm_and_clip_mode_caps():
    w = torch.nn.Parameter(torch.zeros(3))
    opt = NormalizedSGD([w], lr=0.1, momentum=0.0)
    w.grad = torch.tensor([3.0, 4.0, 0.0])
    opt.step()
    assert torch.allclose(w.detach().norm(), torch.tensor(0.1))
    v = torch.nn.Parameter(torch.zeros(2))
    clip = NormalizedSGD([v], lr=1.0, momentum=0.0, mode="clip", clip=10.0)
    v.grad = torch.tensor([0.3, 0.4])
    clip.step()  # norm 0.5 < clip: plain SGD step
    assert torch.allclose(v.detach(), torch.tensor([-0.3, -0.4]))
