"""Proto-MAML's head: prototype scores, the meta-gradient through the prototypes, its errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import class_tasks
from torch import nn
from torch.func import functional_call

from metaopt import ConfigError, HeadedModel, MetaLearner
from metaopt.models import mlp
from metaopt.plugins import ANIL, ProtoHead
from metaopt.plugins.proto_head import prototype_head

STEPS, LR = 2, 0.3


def _model():
    torch.manual_seed(0)
    return HeadedModel(nn.Sequential(nn.Linear(4, 6), nn.Tanh()), nn.Linear(6, 3)).double()


def test_prototype_head_scores_are_negative_squared_distances_up_to_a_shared_term():
    g = torch.Generator().manual_seed(0)
    features, labels = torch.randn(8, 5, generator=g, dtype=torch.float64), torch.tensor([0, 1, 2, 3] * 2)
    weight, bias = prototype_head(features, labels, 4)
    prototypes = torch.stack([features[labels == c].mean(0) for c in range(4)])
    z = torch.randn(6, 5, generator=g, dtype=torch.float64)
    scores = z @ weight.T + bias
    expected = -(torch.cdist(z, prototypes) ** 2) + (z * z).sum(1, keepdim=True)
    assert torch.allclose(scores, expected, atol=1e-12)


def test_zero_steps_is_a_prototypical_network():
    model, tasks = _model(), class_tasks(3)
    learner = MetaLearner(model, [ProtoHead()], inner_steps=1, inner_lr=LR)
    for sx, sy, qx, qy in tasks:
        logits = learner.predict((sx, sy, qx, qy), steps=0)
        with torch.no_grad():
            fs, _ = model(sx, return_features=True)
            fq, _ = model(qx, return_features=True)
        prototypes = torch.stack([fs[sy == c].mean(0) for c in range(3)])
        distances = torch.cdist(fq, prototypes) ** 2
        assert torch.allclose(logits - logits[:, :1], -(distances - distances[:, :1]), atol=1e-10)
        accuracy = learner.evaluate([(sx, sy, qx, qy)], steps=0).metrics["accuracy"]
        assert accuracy == pytest.approx(float((distances.argmin(1) == qy).double().mean()), abs=1e-6)


def _objective(model, params, tasks, centre=None):
    """Mean query loss after STEPS plain steps from the prototype head, by value (float64).

    The prototypes are computed at ``params`` (they move with the body), or at ``centre`` when given
    (held fixed, as ``first_order_init`` treats them).
    """
    total = 0.0
    for sx, sy, qx, qy in tasks:
        features, _ = functional_call(model, params if centre is None else centre, (sx,), {"return_features": True})
        weight, bias = prototype_head(features, sy, 3)
        fast = {**params, "head.weight": weight, "head.bias": bias}
        for _ in range(STEPS):
            leaves = {n: t.detach().requires_grad_() for n, t in fast.items()}
            loss = F.cross_entropy(functional_call(model, leaves, (sx,)), sy)
            grads = torch.autograd.grad(loss, list(leaves.values()))
            fast = {n: fast[n] - LR * g for n, g in zip(leaves, grads)}
        total += float(F.cross_entropy(functional_call(model, fast, (qx,)), qy))
    return total / len(tasks)


@pytest.mark.parametrize("engine", ["loop", "vmap"])
@pytest.mark.parametrize("first_order_init", [False, True])
def test_body_meta_gradient_matches_central_differences(first_order_init, engine):
    """Second-order MAML from the prototype head: the body's gradient, against float64 differences.

    With ``first_order_init`` the prototypes are constants of the meta-gradient, so the reference
    holds them fixed at the centre point; otherwise they move with the body.  (Under the loop
    engine the inner gradient w.r.t. the body must not include the path through the prototypes:
    a first version did, and only this check caught it.)
    """
    model, tasks = _model(), class_tasks(2)
    learner = MetaLearner(
        model, [ProtoHead(first_order_init=first_order_init)], inner_steps=STEPS, inner_lr=LR, engine=engine
    )
    learner.backward(tasks)
    body = [p for n, p in model.named_parameters() if not n.startswith("head.")]
    assert all(p.grad is None or not p.grad.any() for n, p in model.named_parameters() if n.startswith("head."))
    grad = torch.cat([p.grad.flatten() for p in body])
    direction = torch.randn(grad.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    start = torch.nn.utils.parameters_to_vector(body).detach().clone()
    centre = {n: p.detach().clone() for n, p in model.named_parameters()}

    def at(h):
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(start + h * direction, body)
        params = {n: p.detach() for n, p in model.named_parameters()}
        return _objective(model, params, tasks, centre=centre if first_order_init else None)

    h = 1e-5
    fd = (at(h) - at(-h)) / (2 * h)
    analytic = float(grad @ direction)
    assert abs(fd - analytic) < 1e-7 * max(1.0, abs(analytic)), (fd, analytic)
    torch.nn.utils.vector_to_parameters(start, body)
    full = _objective(model, {n: p.detach() for n, p in model.named_parameters()}, tasks)
    assert full == pytest.approx(float(learner.evaluate(tasks, steps=STEPS).metrics["query_loss"]), rel=1e-6)


def test_refuses_a_regression_head_and_a_frozen_head():
    with pytest.raises(ConfigError, match="proto_head needs a classifier"):
        MetaLearner(mlp().double(), [ProtoHead()], inner_steps=1, loss_fn=F.mse_loss)
    learner = MetaLearner(_model(), [ANIL(prefixes="body."), ProtoHead()], inner_steps=1)
    with pytest.raises(ConfigError, match="not adapted parameters"):
        learner.backward(class_tasks(1))
