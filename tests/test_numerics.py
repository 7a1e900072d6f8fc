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
