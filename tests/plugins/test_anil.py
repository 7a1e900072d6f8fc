from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import image_tasks
from reference import maml_meta_grad

from metaopt import MetaLearner
from metaopt.errors import ConfigError, PluginConflictError
from metaopt.models import conv4
from metaopt.plugins import ANIL, HyperMAML

BACKENDS = ["higher", "torch.func"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_anil_meta_gradient_equals_head_only_maml_by_hand(backend):
    """conv4 with BatchNorm, 2 steps: the head adapts, the body gets its second-order gradient."""
    torch.manual_seed(0)
    model = conv4(num_classes=5, hidden=8).double()
    tasks = image_tasks(2)
    learner = MetaLearner(model, [ANIL()], inner_steps=2, inner_lr=0.3, backend=backend)
    assert learner.adapted_names == ["head.weight", "head.bias"]
    learner.backward(tasks)
    expected = maml_meta_grad(model, tasks, 2, 0.3, F.cross_entropy, names=["head.weight", "head.bias"])
    for n, p in model.named_parameters():
        assert (p.grad - expected[n]).abs().max() < 1e-10 * max(1.0, expected[n].abs().max().item()), n
    assert model.body[0][0].weight.grad.abs().sum() > 0


def test_anil_finds_a_timm_classifier_and_takes_prefixes():
    model = timm.create_model("resnet10t", num_classes=5, in_chans=1)
    assert MetaLearner(model, [ANIL()]).adapted_names == ["fc.weight", "fc.bias"]
    both = MetaLearner(model, [ANIL(prefixes="fc.+layer4.0.conv2.")]).adapted_names
    assert both[-2:] == ["fc.weight", "fc.bias"] and "layer4.0.conv2.weight" in both


def test_anil_errors_name_the_fix():
    with pytest.raises(ConfigError, match="no trainable parameter starts with"):
        MetaLearner(conv4(hidden=8), [ANIL(prefixes=["classifier."])])
    with pytest.raises(ConfigError, match="could not find the head"):
        MetaLearner(torch.nn.Sequential(torch.nn.Linear(2, 2)), [ANIL()])
    with pytest.raises(PluginConflictError, match="hypermaml"):
        MetaLearner(conv4(hidden=8), [ANIL(), HyperMAML()])
