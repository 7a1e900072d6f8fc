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
