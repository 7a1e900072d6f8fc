from __future__ import annotations

import torch
import torch.nn.functional as F
from conftest import regression_tasks
from reference import maml_meta_grad

from metaopt import MetaLearner, hookimpl
from metaopt.data import SinusoidTasks
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


def _per_task_cosines(model, tasks, steps, lr, loss_fn, freeze):
    cos = []
    for task in tasks:
        exact = torch.cat([g.flatten() for g in maml_meta_grad(model, [task], steps, lr, loss_fn).values()])
        model.zero_grad()
        plugin = ConvergentFO(delta=1e-3, freeze_activations=freeze)
        MetaLearner(model, [plugin], inner_steps=steps, inner_lr=lr, loss_fn=loss_fn).backward([task])
        cos.append(F.cosine_similarity(_flat(model), exact, 0).item())
    return cos


def _conv_pool_net():
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 4 * 4, 5),
    ).double()


def test_convergent_fo_on_relu_and_max_pool_nets_matches_every_task():
    """ReLUs that flip (max-pool winners that change) inside the stencil added a 1/delta term;
    with the activation pieces frozen at the stencil's centre every task's estimate is right."""
    torch.manual_seed(0)
    mlp_tasks = [tuple(t.double() for t in task) for task in SinusoidTasks(shots=10, seed=0).sample(20)]
    sinusoid = mlp().double()
    g = torch.Generator().manual_seed(0)
    conv_tasks = [
        (torch.randn(5, 1, 8, 8, generator=g, dtype=torch.float64), torch.arange(5))
        + (torch.randn(10, 1, 8, 8, generator=g, dtype=torch.float64), torch.arange(5).repeat(2))
        for _ in range(8)
    ]
    conv = _conv_pool_net()
    for model, tasks, steps, lr, loss_fn in (
        (sinusoid, mlp_tasks, 5, 0.01, F.mse_loss),
        (conv, conv_tasks, 3, 0.1, F.cross_entropy),
    ):
        frozen = _per_task_cosines(model, tasks, steps, lr, loss_fn, freeze=True)
        assert min(frozen) > 1 - 1e-8, frozen
        unfrozen = _per_task_cosines(model, tasks, steps, lr, loss_fn, freeze=False)
        assert min(unfrozen) < 0.99, unfrozen  # the failure the freeze removes is really there


def test_convergent_fo_gives_non_adapted_parameters_their_second_order_terms():
    """Head-only adaptation: the body gets d L_Q / d body through the inner steps too."""

    class HeadOnly:
        name = "head_only"

        @hookimpl
        def adapted_params(self, learner, candidates):
            return [n for n in candidates if n.startswith("head.")]

    torch.manual_seed(0)
    model = mlp(hidden=(16, 16)).double()
    tasks = regression_tasks(2, shots=8)
    head = ["head.weight", "head.bias"]
    exact = torch.cat([g.flatten() for g in maml_meta_grad(model, tasks, 3, 0.1, F.mse_loss, names=head).values()])
    errors = {}
    for plugin in (ConvergentFO(delta=1e-4), FOMAML()):
        model.zero_grad()
        MetaLearner(model, [HeadOnly(), plugin], inner_steps=3, inner_lr=0.1, loss_fn=F.mse_loss).backward(tasks)
        errors[plugin.name] = ((_flat(model) - exact).norm() / exact.norm()).item()
    assert errors["convergent_fo"] < 1e-6 and errors["fomaml"] > 1e-2, errors


def test_convergent_fo_under_vmap_equals_the_loop_engine_with_frozen_pieces_and_non_adapted_parameters():
    """Per-task step sizes and recorded ReLU / max-pool pieces stay per task inside vmap."""

    class HeadOnly:
        name = "head_only"
        vmap_safe = True

        @hookimpl
        def adapted_params(self, learner, candidates):
            return [n for n in candidates if n.startswith("head.")]

    g = torch.Generator().manual_seed(0)
    conv_tasks = [
        (torch.randn(5, 1, 8, 8, generator=g, dtype=torch.float64), torch.arange(5))
        + (torch.randn(10, 1, 8, 8, generator=g, dtype=torch.float64), torch.arange(5).repeat(2))
        for _ in range(4)
    ]
    sine = [tuple(t.double() for t in task) for task in SinusoidTasks(shots=10, seed=0).sample(6)]
    cases = {
        "relu mlp": (lambda: mlp().double(), [], sine, 3, 0.01, F.mse_loss),
        "head only": (lambda: mlp(hidden=(16, 16)).double(), [HeadOnly()], sine, 2, 0.1, F.mse_loss),
        "conv max-pool": (_conv_pool_net, [], conv_tasks, 2, 0.1, F.cross_entropy),
    }
    for label, (make, extra, tasks, steps, lr, loss_fn) in cases.items():
        grads = {}
        for engine in ("loop", "vmap"):
            torch.manual_seed(0)
            model = make()
            learner = MetaLearner(
                model, [*extra, ConvergentFO()], inner_steps=steps, inner_lr=lr, loss_fn=loss_fn, engine=engine
            )
            result = learner.backward(tasks)
            assert learner.last_engine == engine and torch.isfinite(result.loss)
            grads[engine] = _flat(model)
        assert grads["loop"].norm() > 0, label
        error = ((grads["vmap"] - grads["loop"]).norm() / grads["loop"].norm()).item()
        assert error < 1e-10, (label, error)


def test_convergent_fo_under_vmap_handles_a_zero_query_gradient_per_task():
    """A task whose query loss is flat (zero vector) gets exactly zero, its neighbours their value."""
    torch.manual_seed(0)
    tasks = regression_tasks(3, shots=8)
    model = mlp(hidden=(8,)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()  # output 0 everywhere: a task with query targets 0 has a zero query gradient
    x, _, qx, _ = tasks[1]
    tasks[1] = (x, torch.zeros_like(x), qx, torch.zeros_like(qx))  # stays at 0: a zero query gradient
    grads = {}
    for engine in ("loop", "vmap"):
        model.zero_grad()
        MetaLearner(model, [ConvergentFO()], inner_steps=1, inner_lr=0.1, loss_fn=F.mse_loss, engine=engine).backward(
            tasks
        )
        grads[engine] = _flat(model)
    assert torch.isfinite(grads["vmap"]).all() and grads["loop"].norm() > 0
    assert ((grads["vmap"] - grads["loop"]).norm() / grads["loop"].norm()).item() < 1e-10
