from __future__ import annotations

import pytest
import torch
from conftest import image_tasks

from metaopt import MetaLearner, PluginConflictError, hookimpl
from metaopt.models import conv4
from metaopt.plugins import SHOT, ConvergentFO, HyperMAML, Reptile, SharpMAML


class HeadOnly:
    name = "head_only"

    @hookimpl
    def adapted_params(self, learner, candidates):
        return [n for n in candidates if n.startswith("head.")]


class CountInnerGrads:
    name = "count_inner_grads"

    def __init__(self):
        self.calls = 0

    @hookimpl(wrapper=True)
    def inner_grad(self, task, params):
        self.calls += 1
        return (yield)


def _model():
    torch.manual_seed(0)
    return conv4(num_classes=5, hidden=8).double()


def test_warmup_equals_head_only_maml_exactly():
    tasks = image_tasks(2)
    model = _model()
    learner = MetaLearner(model, [HyperMAML(warmup_iters=10, maml_steps=3, maml_lr=0.1)])
    learner.backward(tasks)
    hyper = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in learner.plugin_modules.parameters())
    model.zero_grad()
    MetaLearner(model, [HeadOnly()], inner_steps=3, inner_lr=0.1).backward(tasks)
    assert all(torch.equal(hyper[n], p.grad) for n, p in model.named_parameters())


def test_after_warmup_no_inner_backward_and_hypernet_learns():
    model = _model()
    counter = CountInnerGrads()
    plugin = HyperMAML(hidden=32, warmup_iters=0, blend_iters=0)
    learner = MetaLearner(model, [counter, plugin])
    opt = torch.optim.Adam(learner.parameters(), 1e-3)
    for _ in range(2):  # the zero-initialised last layer must move before gradients reach the rest
        opt.zero_grad()
        learner.backward(image_tasks(2, seed=_))
        opt.step()
    assert counter.calls == 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in learner.plugin_modules.parameters())
    assert learner.model.body[0][0].weight.grad.abs().sum() > 0  # the backbone learns through the query loss


def test_zero_steps_means_no_update_at_all():
    """The 'unadapted' baseline of an evaluation (steps=0) must not apply the hypernetwork."""
    model = _model()
    learner = MetaLearner(model, [HyperMAML(hidden=16, warmup_iters=0, blend_iters=0)])
    with torch.no_grad():  # a non-zero hypernetwork output, so adaptation does change the head
        for p in learner.plugin_modules.parameters():
            p.normal_(0.0, 0.5)
    tasks = image_tasks(2)
    unadapted = learner.evaluate(tasks, steps=0).metrics["query_loss"]
    adapted = learner.evaluate(tasks, steps=1).metrics["query_loss"]
    with torch.no_grad():  # BatchNorm on batch statistics, as the default transductive policy does
        plain = torch.stack([torch.nn.functional.cross_entropy(model(qx), qy) for _, _, qx, qy in tasks]).mean()
    assert unadapted == pytest.approx(float(plain), rel=1e-6) and adapted != pytest.approx(unadapted, rel=1e-3)


def test_blend_schedule_and_state_round_trip():
    plugin = HyperMAML(warmup_iters=2, blend_iters=4)
    # exactly warmup_iters pure-MAML iterations, then blend_iters strictly between 0 and 1
    assert [plugin.blend() for plugin.iteration in range(8)] == pytest.approx([0, 0, 0.2, 0.4, 0.6, 0.8, 1, 1])
    model = _model()
    learner = MetaLearner(model, [HyperMAML(hidden=16)])
    learner.backward(image_tasks(1))
    state, pstate = learner.state_dict(), learner.plugin_state()
    assert any(k.startswith("plugin_modules.hypernet.") for k in state) and pstate["hypermaml"]["iteration"] == 1
    other = MetaLearner(_model(), [HyperMAML(hidden=16)])
    other.load_state_dict(state)
    other.load_plugin_state(pstate)
    assert other.get_plugin("hypermaml").iteration == 1
    for (n, a), b in zip(learner.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), n


def test_evaluation_uses_the_pure_hypernetwork_once_training_has_left_warm_up():
    tasks = image_tasks(2)
    results = {}
    for mode in ("auto", "schedule", "hyper"):
        model = _model()
        learner = MetaLearner(model, [HyperMAML(hidden=16, warmup_iters=2, blend_iters=4, eval_mode=mode)])
        with torch.no_grad():
            for p in learner.plugin_modules.parameters():
                p.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(p.numel()))
        plugin = learner.get_plugin("hypermaml")
        plugin.iteration = 3  # mid-blend
        results[mode] = learner.evaluate(tasks).metrics["query_loss"]
        plugin.iteration = 1  # still in warm-up: MAML, also for "auto"
        results[mode + "_warmup"] = learner.evaluate(tasks).metrics["query_loss"]
    assert results["auto"] == results["hyper"] != pytest.approx(results["schedule"], rel=1e-6)
    assert results["auto_warmup"] == results["schedule_warmup"] != pytest.approx(results["hyper_warmup"], rel=1e-6)


def test_rejected_combinations_say_what_to_do():
    with pytest.raises(PluginConflictError, match="hypermaml"):
        MetaLearner(_model(), [HyperMAML(), SHOT()])
    with pytest.raises(PluginConflictError, match="would ever train"):
        MetaLearner(_model(), [HyperMAML(), Reptile()])
    with pytest.raises(PluginConflictError, match="plain SGD inner steps"):
        MetaLearner(_model(), [ConvergentFO(), HyperMAML()], inner_steps=3)
    with pytest.raises(PluginConflictError, match="rho_outer"):
        MetaLearner(_model(), [HyperMAML(), SharpMAML(rho_inner=0.05)])
    MetaLearner(_model(), [HyperMAML(), SharpMAML(rho_outer=0.05)]).backward(image_tasks(1))
