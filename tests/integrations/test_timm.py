from __future__ import annotations

import pytest
import torch

from metaopt.cli import main
from metaopt.errors import ConfigError
from metaopt.integrations.timm import backbone


def test_unknown_timm_name_suggests_close_names():
    with pytest.raises(ConfigError, match="resnet10t"):
        backbone("resnet10x")


def test_backbone_has_fresh_head_and_returns_features():
    model = backbone("resnet10t", num_classes=7, in_chans=1, img_size=28)
    feats, out = model(torch.zeros(2, 1, 28, 28), return_features=True)
    assert out.shape == (2, 7) and feats.shape == (2, model.head.in_features)


def test_pretrained_must_be_a_local_file():
    with pytest.raises(ConfigError, match="pretrained_path"):
        backbone("resnet10t", pretrained=True)


def test_timm_backbone_meta_trains_through_cli(tmp_path):
    assert (
        main(
            [
                "train",
                "--model",
                "resnet10t",
                "--iterations",
                "2",
                "--meta-batch",
                "2",
                "--query",
                "2",
                "--out",
                str(tmp_path / "r"),
                "--no-progress",
            ]
        )
        == 0
    )
