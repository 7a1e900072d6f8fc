"""The model registry's own networks: conv4 (and its variant keeping the last map), the MLP."""

from __future__ import annotations

import pytest
import torch

from metaopt import ConfigError
from metaopt.config import TrainConfig
from metaopt.models import conv4, create_model, list_models
from metaopt.trainer import build_model


@pytest.mark.parametrize(("pools", "dim"), [(4, 64), (3, 64 * 3 * 3), (2, 64 * 7 * 7)])
def test_conv4_embedding_size_follows_the_pools(pools, dim):
    model = conv4(num_classes=20, pools=pools)
    features, logits = model(torch.zeros(2, 1, 28, 28), return_features=True)
    assert features.shape == (2, dim) and logits.shape == (2, 20)
    assert model.head.in_features == dim


def test_conv4_3pool_is_registered_and_built_by_the_trainer():
    assert "conv4_3pool" in list_models()
    assert create_model("conv4_3pool", num_classes=5).head.in_features == 576
    config = TrainConfig.from_dict({"data": "glyphs", "model": "conv4_3pool", "ways": 5}, source="test")
    assert build_model(config).head.in_features == 576


def test_conv4_refuses_a_pool_count_out_of_range():
    with pytest.raises(ConfigError, match="pools=5"):
        conv4(pools=5)


def test_mlp_paper_is_the_mlp_initialised_as_the_maml_authors_code():
    torch.manual_seed(0)
    config = TrainConfig.from_dict({"data": "sinusoid", "model": "mlp_paper"}, source="test")
    model = build_model(config)
    default = create_model("mlp")
    assert [p.shape for p in model.parameters()] == [p.shape for p in default.parameters()]
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    biases = [m.bias for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert all(float(b.abs().max()) == 0.0 for b in biases)
    assert all(float(w.abs().max()) <= 0.02 for w in weights)  # truncated at two standard deviations
    hidden = weights[1]  # 40 x 40: 1,600 draws
    assert 0.0075 < float(hidden.std()) < 0.0095  # std 0.01 truncated at 2 sd: 0.0088
    # PyTorch's default draws uniform weights of scale 1/sqrt(40) = 0.16 there
    assert float(default.body[2].weight.abs().max()) > 0.1
    with pytest.raises(ConfigError, match=r"model='mlp_paper' is the sinusoid regression MLP"):
        TrainConfig.from_dict({"data": "glyphs", "model": "mlp_paper"}, source="test")
