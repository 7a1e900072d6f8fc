"""The loop against independent torch.func meta-gradients, and its contracts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import image_tasks, regression_tasks
from reference import maml_meta_grad

from metaopt import DataError, MetaLearner, hookimpl
from metaopt.models import conv4, mlp


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _max_diff(a, b):
    return max((a[n] - b[n]).abs().max().item() for n in a)


def test_second_order_mlp_matches_torch_func_float64():
    torch.manual_seed(0)
    model = mlp().double()
    tasks = regression_tasks(3)
    learner = MetaLearner(model, inner_steps=3, inner_lr=0.05, loss_fn=F.mse_loss)
    learner.backward(tasks)
    ref = maml_meta_grad(model, tasks, 3, 0.05, F.mse_loss)
    assert _max_diff(_grads(model), ref) < 1e-8
    # and second order really differs from first order here
    fo = maml_meta_grad(model, tasks, 3, 0.05, F.mse_loss, first_order=True)
    assert _max_diff(ref, fo) > 1e-4


def test_second_order_conv4_matches_torch_func_float64():
    torch.manual_seed(0)
    model = conv4(num_classes=5, hidden=8).double()
    tasks = image_tasks(2)
    learner = MetaLearner(model, inner_steps=2, inner_lr=0.4)
    learner.backward(tasks)
    ref = maml_meta_grad(model, tasks, 2, 0.4, F.cross_entropy)
    assert _max_diff(_grads(model), ref) < 1e-8


def test_first_order_flag_gives_query_gradient_at_adapted_params():
    torch.manual_seed(1)
    model = mlp().double()
    tasks = regression_tasks(1)
    learner = MetaLearner(model, inner_steps=2, inner_lr=0.05, loss_fn=F.mse_loss, first_order=True)
    learner.backward(tasks)
    # independent: adapt by hand, then grad of the query loss at theta_K
    sx, sy, qx, qy = tasks[0]
    fast = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    for _ in range(2):
        out = torch.func.functional_call(model, fast, (sx,))
        g = torch.autograd.grad(F.mse_loss(out, sy), list(fast.values()))
        fast = {n: (p - 0.05 * gi).detach().requires_grad_() for (n, p), gi in zip(fast.items(), g)}
    q = torch.autograd.grad(F.mse_loss(torch.func.functional_call(model, fast, (qx,)), qy), list(fast.values()))
    expected = dict(zip(fast, q))
    assert _max_diff(_grads(model), expected) < 1e-12


def test_per_step_learning_rates_are_used_in_order():
    torch.manual_seed(2)
    model = mlp().double()
    tasks = regression_tasks(1)
    learner = MetaLearner(model, inner_steps=2, inner_lr=[0.05, 0.01], loss_fn=F.mse_loss)
    learner.backward(tasks)
    sx, sy, qx, qy = tasks[0]
    params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    fast = dict(params)
    for lr in (0.05, 0.01):
        loss = F.mse_loss(torch.func.functional_call(model, fast, (sx,)), sy)
        g = torch.autograd.grad(loss, list(fast.values()), create_graph=True)
        fast = {n: p - lr * gi for (n, p), gi in zip(fast.items(), g)}
    meta = F.mse_loss(torch.func.functional_call(model, fast, (qx,)), qy)
    ref = dict(zip(params, torch.autograd.grad(meta, list(params.values()))))
    assert _max_diff(_grads(model), ref) < 1e-10


def test_momentum_inner_optimizer_is_differentiable():
    torch.manual_seed(3)
    model = mlp().double()
    tasks = regression_tasks(1)
    learner = MetaLearner(
        model,
        inner_steps=3,
        inner_lr=0.02,
        loss_fn=F.mse_loss,
        inner_optimizer="sgd",
        inner_optimizer_kwargs={"momentum": 0.9},
    )
    learner.backward(tasks)
    sx, sy, qx, qy = tasks[0]
    params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    fast, buf = dict(params), None
    for _ in range(3):
        loss = F.mse_loss(torch.func.functional_call(model, fast, (sx,)), sy)
        g = torch.autograd.grad(loss, list(fast.values()), create_graph=True)
        buf = list(g) if buf is None else [0.9 * b + gi for b, gi in zip(buf, g)]
        fast = {n: p - 0.02 * b for (n, p), b in zip(fast.items(), buf)}
    meta = F.mse_loss(torch.func.functional_call(model, fast, (qx,)), qy)
    ref = dict(zip(params, torch.autograd.grad(meta, list(params.values()))))
    assert _max_diff(_grads(model), ref) < 1e-10


def test_adam_inner_optimizer_runs_and_reaches_meta_params():
    model = mlp()
    learner = MetaLearner(model, inner_steps=2, inner_lr=0.01, loss_fn=F.mse_loss, inner_optimizer="adam")
    learner.backward(regression_tasks(2, dtype=torch.float32))
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_frozen_parameters_are_not_adapted_and_get_no_grad():
    model = mlp()
    model.body[0].weight.requires_grad_(False)
    learner = MetaLearner(model, inner_steps=1, inner_lr=0.01, loss_fn=F.mse_loss)
    assert "body.0.weight" not in learner.adapted_names
    learner.backward(regression_tasks(2, dtype=torch.float32))
    assert model.body[0].weight.grad is None
    assert model.body[0].bias.grad is not None


def test_batchnorm_running_stats_untouched_and_patched_once():
    model = conv4(num_classes=5, hidden=8)
    before = {n: b.clone() for n, b in model.named_buffers()}
    learner = MetaLearner(model, inner_steps=2, inner_lr=0.4)
    for _ in range(3):
        learner.backward(image_tasks(2, dtype=torch.float32))
    learner.evaluate(image_tasks(2, dtype=torch.float32))
    assert all(torch.equal(before[n], b) for n, b in model.named_buffers())
    assert learner.backend.patch_count == 1
    # higher's history list is cleared after each call: nothing from old tasks is kept alive
    assert learner.backend._fmodel._fast_params is None


def test_running_bn_policy_uses_model_statistics():
    model = conv4(num_classes=5, hidden=8)
    tasks = image_tasks(1, dtype=torch.float32)
    a = MetaLearner(model, inner_steps=0, bn_policy="transductive").evaluate(tasks).metrics["query_loss"]
    b = MetaLearner(model, inner_steps=0, bn_policy="running").evaluate(tasks).metrics["query_loss"]
    model.eval()
    with torch.no_grad():
        expected = F.cross_entropy(model(tasks[0][2]), tasks[0][3]).item()
    assert abs(b - expected) < 1e-5
    assert abs(a - expected) > 1e-3


def test_evaluate_builds_no_meta_graph():
    model = mlp()
    learner = MetaLearner(model, inner_steps=2, inner_lr=0.01, loss_fn=F.mse_loss)
    result = learner.evaluate(regression_tasks(3, dtype=torch.float32), steps=5)
    assert all(p.grad is None for p in model.parameters())
    assert not result.loss.requires_grad
    assert len(result.per_task["query_loss"]) == 3


def test_stacked_batch_equals_list_of_tasks():
    model = mlp().double()
    tasks = regression_tasks(3)
    stacked = [torch.stack([t[i] for t in tasks]) for i in range(4)]
    learner = MetaLearner(model, inner_steps=1, inner_lr=0.01, loss_fn=F.mse_loss)
    assert learner(tasks).loss.item() == learner(stacked).loss.item()


def test_one_task_without_a_list_is_refused_not_read_as_many_one_point_tasks():
    """learner.backward(task) with a sinusoid task of 10 support and 10 query points read it as a stacked batch:
    10 tasks of one point each, trained without a word (an image task stopped with an IndexError)."""
    from metaopt.data import SinusoidTasks
    from metaopt.data.glyphs import GlyphTasks

    regression = MetaLearner(mlp(), loss_fn=F.mse_loss)
    task = SinusoidTasks(shots=10, query=10, seed=0).sample(1)[0]
    with pytest.raises(DataError, match=r"would make 10 tasks of one support and one query example.*ONE task"):
        regression.backward(task)
    regression.backward([task])  # the list form, and a real stacked batch, run
    regression.backward(torch.utils.data.default_collate(SinusoidTasks(shots=10, query=10, seed=0).sample(3)))
    glyphs = GlyphTasks(ways=5, shots=2, query=2, seed=0).sample_task()
    with pytest.raises(DataError, match=r"shapes \[\(10, 1, 28, 28\), \(10,\).*ONE task"):
        MetaLearner(conv4(num_classes=5), inner_lr=0.4).backward(glyphs)


def test_adapt_returns_detached_adapted_params():
    model = mlp()
    learner = MetaLearner(model, inner_steps=1, inner_lr=0.01, loss_fn=F.mse_loss)
    params = learner.adapt(regression_tasks(1, dtype=torch.float32)[0], steps=3)
    assert set(params) == set(learner.adapted_names)
    assert not any(p.requires_grad for p in params.values())
    assert not torch.equal(params["head.weight"], model.head.weight)


class _GraphProbe:
    """Records, at each task's start, whether the previous task's graph was already freed."""

    name = "graph_probe"

    def __init__(self) -> None:
        self.previous = None
        self.freed: list[bool] = []

    @hookimpl
    def task_start(self, task) -> None:
        if self.previous is not None and task.training:
            try:
                _ = self.previous.loss.grad_fn._saved_self  # MSE keeps its input until backward frees it
                self.freed.append(False)
            except RuntimeError:
                self.freed.append(True)

    @hookimpl
    def task_end(self, task) -> None:
        self.previous = task


class _BatchOuterStep:
    """Replaces outer_step with the batch-graph backward (what a replacing plugin sees)."""

    name = "batch_outer_step"

    @hookimpl
    def outer_step(self, batch) -> bool:
        batch.backward(batch.meta_loss)
        return True


def test_default_outer_step_backpropagates_task_by_task_with_the_same_gradient():
    torch.manual_seed(0)
    model = mlp().double()
    tasks = regression_tasks(3)
    per_task = MetaLearner(model, [_GraphProbe()], inner_steps=2, inner_lr=0.05, loss_fn=F.mse_loss)
    probe = per_task.get_plugin("graph_probe")
    result = per_task.backward(tasks)
    assert probe.freed == [True, True] and not result.loss.requires_grad
    streamed = _grads(model)
    model.zero_grad(set_to_none=True)
    whole = MetaLearner(model, [_GraphProbe(), _BatchOuterStep()], inner_steps=2, inner_lr=0.05, loss_fn=F.mse_loss)
    whole.backward(tasks)
    assert whole.get_plugin("graph_probe").freed == [False, False]  # the replacing plugin needs every graph
    assert _max_diff(streamed, _grads(model)) < 1e-12
    assert _max_diff(streamed, maml_meta_grad(model, tasks, 2, 0.05, F.mse_loss)) < 1e-8
    model.zero_grad(set_to_none=True)
    batched = MetaLearner(
        model, [_GraphProbe()], inner_steps=2, inner_lr=0.05, loss_fn=F.mse_loss, per_task_backward=False
    )
    batched.backward(tasks)
    assert batched.get_plugin("graph_probe").freed == [False, False]
    assert _max_diff(streamed, _grads(model)) < 1e-12
    model.zero_grad(set_to_none=True)
    kept = MetaLearner(model, inner_steps=2, inner_lr=0.05, loss_fn=F.mse_loss).forward(tasks)
    kept.loss.backward()  # forward() keeps the batch graph for the caller's own backward
    assert _max_diff(streamed, _grads(model)) < 1e-12


def test_successive_backward_calls_accumulate_like_loss_backward():
    torch.manual_seed(0)
    model = mlp().double()
    first, second = regression_tasks(2, seed=1), regression_tasks(2, seed=2)
    learner = MetaLearner(model, inner_steps=1, inner_lr=0.05, loss_fn=F.mse_loss)
    learner.backward(first)
    learner.backward(second)
    expected = maml_meta_grad(model, first, 1, 0.05, F.mse_loss)
    expected = {n: g + maml_meta_grad(model, second, 1, 0.05, F.mse_loss)[n] for n, g in expected.items()}
    assert _max_diff(_grads(model), expected) < 1e-10


def test_tasks_may_be_dicts_of_the_four_fields():
    """A dict task was iterated for its keys: AttributeError: 'str' object has no attribute 'dtype'."""
    tasks = regression_tasks(2)
    learner = MetaLearner(mlp().double(), inner_steps=1, inner_lr=0.01, loss_fn=F.mse_loss)
    as_dicts = [dict(zip(("support_x", "support_y", "query_x", "query_y"), t, strict=True)) for t in tasks]
    assert learner(as_dicts).loss.item() == learner(tasks).loss.item()
    adapted, from_dict = learner.adapt(tasks[0]), learner.adapt(as_dicts[0])
    assert all(torch.equal(adapted[k], from_dict[k]) for k in adapted)
    assert torch.equal(learner.predict(as_dicts[0]), learner.predict(tasks[0]))
    with pytest.raises(DataError, match=r"task 0 is a mapping without \['query_x', 'query_y'\]"):
        learner([{"support_x": tasks[0][0], "support_y": tasks[0][1]}])


def test_a_head_with_more_outputs_than_classes_warns_on_the_first_batch():
    """A pretrained 1000-class head kept by mistake trained as 1000-way softmax on 5-way tasks, without a word."""
    import warnings

    from metaopt.learner import ExtraOutputsWarning

    tasks = image_tasks(2, ways=5, dtype=torch.float32)
    with pytest.warns(ExtraOutputsWarning, match=r"the model has 12 outputs but tasks have 5 classes: the other 7"):
        MetaLearner(conv4(num_classes=12, hidden=8), inner_lr=0.1).backward(tasks)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExtraOutputsWarning)
        MetaLearner(conv4(num_classes=5, hidden=8), inner_lr=0.1).backward(tasks)
