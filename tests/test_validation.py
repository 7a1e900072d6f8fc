"""Bad input is caught at the first batch, before any step, with the value and the fix named."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import image_tasks, regression_tasks

from metaopt import MetaLearner
from metaopt.config import TrainConfig
from metaopt.errors import ConfigError, DataError
from metaopt.models import conv4, mlp


def _conv_learner() -> MetaLearner:
    return MetaLearner(conv4(num_classes=5).double(), inner_lr=0.1)


def _relabel(tasks, support=None, query=None):
    sx, sy, qx, qy = tasks[0]
    return [(sx, sy if support is None else support, qx, qy if query is None else query)]


def test_labels_not_zero_to_n_minus_one():
    tasks = image_tasks(1)
    with pytest.raises(DataError, match=r"0\.\.N-1.*\[1, 2, 3, 4, 5\]"):
        _conv_learner().backward(_relabel(tasks, support=tasks[0][1] + 1))


def test_query_label_missing_from_support():
    tasks = image_tasks(1)
    query = tasks[0][3].clone()
    query[0] = 7
    with pytest.raises(DataError, match=r"query labels \[7\]"):
        _conv_learner().backward(_relabel(tasks, query=query))


def test_more_classes_than_model_outputs():
    tasks = image_tasks(1, ways=5)
    learner = MetaLearner(conv4(num_classes=3).double(), inner_lr=0.1)
    with pytest.raises(DataError, match=r"5 classes.*num_classes=5"):
        learner.backward(tasks)


def test_input_shape_mismatch_with_the_model():
    sx, sy, qx, qy = image_tasks(1)[0]
    rgb = [(sx.expand(-1, 3, -1, -1), sy, qx.expand(-1, 3, -1, -1), qy)]
    with pytest.raises(DataError, match=r"shape \(5, 3, 28, 28\)"):
        _conv_learner().backward(rgb)


def test_input_dtype_mismatch_with_the_model():
    tasks = image_tasks(1, dtype=torch.float32)  # the model is float64
    with pytest.raises(DataError, match="dtype torch.float32.*torch.float64"):
        _conv_learner().backward(tasks)


def test_regression_target_shape_would_broadcast():
    sx, sy, qx, qy = regression_tasks(1)[0]
    learner = MetaLearner(mlp().double(), loss_fn=F.mse_loss)
    with pytest.raises(DataError, match=r"support targets have shape \(10,\)"):
        learner.backward([(sx, sy.squeeze(1), qx, qy.squeeze(1))])


def test_support_and_query_length_or_shape_mismatch():
    sx, sy, qx, qy = image_tasks(1)[0]
    with pytest.raises(DataError, match="support 5 vs 4"):
        _conv_learner().backward([(sx, sy[:4], qx, qy)])
    with pytest.raises(DataError, match=r"\(1, 28, 28\).*\(1, 14, 14\)"):
        _conv_learner().backward([(sx, sy, qx[:, :, :14, :14], qy)])


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"inner_steps": -1}, "inner_steps=-1"),
        ({"inner_lr": 0.0}, "inner_lr=0.0"),
        ({"inner_lr": [0.1, -0.2]}, r"inner_lr=\[0.1, -0.2\]"),
    ],
)
def test_learner_rejects_bad_loop_settings(kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        MetaLearner(mlp(), **kwargs)


@pytest.mark.parametrize(
    ("values", "needle"),
    [
        ({"inner_steps": -2}, "inner_steps=-2"),
        ({"meta_lr": 0}, "meta_lr=0"),
        ({"clip_grad_norm": -1.0}, "clip_grad_norm=-1.0"),
        ({"on_nonfinite": "ignore"}, "on_nonfinite='ignore'"),
        ({"keep_checkpoints": 0}, "keep_checkpoints=0"),
        ({"inner_lrr": 0.1}, "'inner_lr'"),
    ],
)
def test_config_rejects_bad_values(values, needle):
    with pytest.raises(ConfigError, match=needle):
        TrainConfig.from_dict(values)


def test_a_valid_first_batch_passes_and_leaves_batchnorm_untouched():
    learner = _conv_learner()
    stats = {n: b.clone() for n, b in learner.model.named_buffers()}
    learner.backward(image_tasks(2))
    assert all(torch.equal(stats[n], b) for n, b in learner.model.named_buffers())
    assert learner.model.training
