"""The built-in finite check: where a NaN/inf first appears is what the error says."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import regression_tasks

from metaopt import MetaLearner, hookimpl
from metaopt.errors import NumericalError
from metaopt.models import mlp


def _with_nan_support(n_tasks: int, bad: int):
    tasks = regression_tasks(n_tasks)
    sx, sy, qx, qy = tasks[bad]
    sy = sy.clone()
    sy[3] = float("nan")
    tasks[bad] = (sx, sy, qx, qy)
    return tasks


def test_nan_in_the_support_set_is_caught_in_the_inner_loss():
    learner = MetaLearner(mlp().double(), loss_fn=F.mse_loss)
    learner.iteration = 41
    with pytest.raises(NumericalError, match=r"support loss = nan at iteration 42, task 2.*'inner_loss'") as info:
        learner.backward(_with_nan_support(3, bad=2))
    assert (info.value.iteration, info.value.task, info.value.hook) == (42, 2, "inner_loss")
    assert "builtin:maml" in str(info.value)


class SqrtPenalty:
    """A finite loss term whose gradient is not finite at zero: sqrt(|b|) at b = 0."""

    name = "sqrt_penalty"

    @hookimpl
    def loss_modification(self, task, params, loss):
        return {"sqrt_penalty": task.learner.model.head.bias.abs().sqrt().sum()}


def test_non_finite_meta_gradient_is_caught_at_the_outer_step():
    learner = MetaLearner(mlp().double(), [SqrtPenalty()], loss_fn=F.mse_loss)
    with torch.no_grad():
        learner.model.head.bias.zero_()
    with pytest.raises(NumericalError, match=r"meta-gradient \(in \['model.head.bias'\]\) at iteration 1") as info:
        learner.backward(regression_tasks(2))
    assert info.value.hook == "outer_step" and info.value.task is None


def test_check_can_be_switched_off():
    learner = MetaLearner(mlp().double(), loss_fn=F.mse_loss, check_finite=False)
    result = learner.backward(_with_nan_support(2, bad=1))
    assert torch.isnan(result.loss)


class NaNInnerGrad:
    """Replaces the inner gradient with one whose 'head.bias' entry is NaN."""

    name = "nan_inner_grad"

    @hookimpl
    def inner_grad(self, task, params):
        grads = task.inner_grad_at(params)
        if task.index == 1:
            grads["head.bias"] = grads["head.bias"] * float("nan")
        return grads


def test_non_finite_inner_gradient_names_the_parameter_task_and_plugin():
    learner = MetaLearner(mlp().double(), [NaNInnerGrad()], loss_fn=F.mse_loss)
    with pytest.raises(NumericalError, match=r"inner gradient \(in \['head.bias'\]\) at iteration 1, task 1") as info:
        learner.backward(regression_tasks(3))
    assert info.value.hook == "inner_grad" and "nan_inner_grad" in str(info.value)


def test_the_first_non_finite_value_is_reported_not_a_later_one():
    """Task 1's support loss is NaN and so, downstream, are its query loss and the meta-gradient."""
    learner = MetaLearner(mlp().double(), loss_fn=F.mse_loss)
    with pytest.raises(NumericalError) as info:
        learner.backward(_with_nan_support(3, bad=1))
    assert (info.value.hook, info.value.task) == ("inner_loss", 1)


def test_evaluation_and_single_task_adaptation_are_checked_too():
    learner = MetaLearner(mlp().double(), loss_fn=F.mse_loss)
    with pytest.raises(NumericalError, match=r"task 1 \(evaluation\), in hook 'inner_loss'"):
        learner.evaluate(_with_nan_support(2, bad=1))
    with pytest.raises(NumericalError, match=r"support loss = nan .* task 0 \(evaluation\)"):
        learner.adapt(_with_nan_support(1, bad=0)[0])
    learner.adapt(regression_tasks(1)[0])  # nothing left pending from the failed call


def test_max_abs_is_finite_exactly_where_the_tensor_is():
    from metaopt.numerics import max_abs

    tensors = [
        torch.tensor([1.0, -3.0]),
        torch.zeros(0),
        torch.tensor([float("inf")]),
        torch.tensor([0.5, float("nan")]),
    ]
    values = torch.stack(max_abs(tensors))
    assert values[:2].tolist() == [3.0, 0.0]
    assert torch.isfinite(values).tolist() == [True, True, False, False]


class Huge:
    """A finite loss term whose meta-gradient has entries near float32's largest value (their sum
    overflows): the check must not call it non-finite."""

    name = "huge"

    @hookimpl
    def loss_modification(self, task, params, loss):
        return {"huge": 1e38 * task.learner.model.head.weight.sum()}


@pytest.mark.parametrize("fused", [True, False], ids=["fused check", "sums"])
@pytest.mark.parametrize("engine", ["loop", "vmap"])
def test_finite_values_whose_sum_overflows_pass_the_check(engine, fused, monkeypatch):
    import metaopt.numerics

    if not fused:
        monkeypatch.setattr(metaopt.numerics, "_FUSED_CHECK", None)
    learner = MetaLearner(mlp(), [Huge()], loss_fn=F.mse_loss, engine=engine)
    tasks = [tuple(t.float() for t in task) for task in regression_tasks(3)]
    learner.backward(tasks)  # no NumericalError
    grad = learner.model.head.weight.grad
    assert torch.isfinite(grad).all() and grad.abs().max() > 1e37
    assert not torch.isfinite(grad.sum())  # the fast check's sum did overflow


@pytest.mark.parametrize("engine", ["loop", "vmap"])
def test_the_meta_gradient_check_names_the_non_finite_parameter_on_every_engine(engine):
    learner = MetaLearner(mlp().double(), [SqrtPenalty()], loss_fn=F.mse_loss, engine=engine)
    with torch.no_grad():
        learner.model.head.bias.zero_()
    weight = learner.model.head.weight
    weight.grad = torch.ones_like(weight)
    with pytest.raises(NumericalError, match=r"meta-gradient \(in \['model.head.bias'\]\)"):
        learner.backward(regression_tasks(2))
    assert torch.equal(weight.grad, torch.ones_like(weight))  # .grad as it was


def test_the_fused_check_finds_every_kind_of_non_finite_value_and_leaves_the_values_untouched():
    from metaopt.numerics import _FUSED_CHECK, _all_finite_at_once

    assert _FUSED_CHECK is not None, "this torch has no fused non-finite check: every batch takes the slower sums"
    tiny = torch.finfo(torch.float32).tiny
    finite = [
        torch.tensor([0.0, -0.0, tiny / 4, -3e38, 3e38]),  # a subnormal; a sum that overflows
        torch.tensor([[1.5, -2.0]], dtype=torch.float64).t(),  # not contiguous
        torch.tensor(65504.0, dtype=torch.float16),
        torch.tensor([1e38], dtype=torch.bfloat16),
        torch.zeros(0),
    ]
    bits = [v.clone() for v in finite]
    scratch = {}
    for flush_denormal in (False, True):  # with denormals flushed, a multiplication would zero the subnormal
        torch.set_flush_denormal(flush_denormal)
        try:
            assert _all_finite_at_once(finite, scratch)
        finally:
            torch.set_flush_denormal(False)
        for before, after in zip(bits, finite, strict=True):  # bit for bit: -0.0 and the subnormal included
            assert torch.equal(before.reshape(-1).view(torch.uint8), after.reshape(-1).view(torch.uint8))
    for bad in (float("nan"), float("inf"), float("-inf")):
        for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            assert not _all_finite_at_once([*finite, torch.tensor([1.0, bad], dtype=dtype)], scratch), (bad, dtype)
            assert _all_finite_at_once(finite, scratch)  # the kept flag was put back to 0
    leaf = torch.tensor([1.0, 2.0], requires_grad=True)
    assert _all_finite_at_once([leaf * 3, leaf], scratch)  # values in a graph: nothing recorded, nothing written
    (leaf * 3).sum().backward()
    assert leaf.grad.tolist() == [3.0, 3.0]
    # values the fused check does not take (an integer tensor here) go through the sums, and a flag the
    # fused check raised before it stopped at such a value does not stay raised
    assert not _all_finite_at_once([torch.tensor([float("nan")]), torch.tensor([3])], scratch)
    assert _all_finite_at_once([torch.tensor([1.0]), torch.tensor([3])], scratch)
    assert _all_finite_at_once(finite, scratch)
    assert _all_finite_at_once(finite) and not _all_finite_at_once([torch.tensor(float("nan"))])  # no scratch
