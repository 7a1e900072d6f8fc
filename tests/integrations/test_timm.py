from __future__ import annotations

import pytest
import timm
import torch

from metaopt import MetaLearner
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


FAMILIES = [
    "resnet10t",
    "efficientnet_b0",
    "convnext_atto",
    "deit_tiny_patch16_224",
    "regnetx_002",
    "swin_tiny_patch4_window7_224",
]


def _tiny_tasks(size: int = 32):
    g = torch.Generator().manual_seed(0)
    return [
        (torch.randn(3, 3, size, size, generator=g), torch.arange(3), torch.randn(6, 3, size, size, generator=g))
        + (torch.arange(3).repeat(2),)
        for _ in range(2)
    ]


@pytest.mark.parametrize("name", FAMILIES)
def test_one_second_order_meta_step_per_timm_family(name):
    torch.manual_seed(0)
    learner = MetaLearner(backbone(name, num_classes=3, in_chans=3, img_size=32), inner_steps=1, inner_lr=0.01)
    learner.backward(_tiny_tasks())
    grads = [p.grad for p in learner.meta_parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


def test_attention_needs_fused_attention_off_which_backbone_does():
    torch.manual_seed(0)
    timm.layers.set_fused_attn(True)
    try:
        fused = backbone("deit_tiny_patch16_224", 3, 3, 32, fused_attn=True)
        with pytest.raises(ConfigError, match="scaled_dot_product.*double backward|double backward.*scaled_dot"):
            MetaLearner(fused, inner_steps=1, inner_lr=0.01).backward(_tiny_tasks())
    finally:
        timm.layers.set_fused_attn(False)
    plain = backbone("deit_tiny_patch16_224", 3, 3, 32)  # default: fused attention off
    MetaLearner(plain, inner_steps=1, inner_lr=0.01).backward(_tiny_tasks())
    assert not timm.layers.use_fused_attn()


def test_model_without_double_backward_gets_advice_and_first_order_works():
    torch.manual_seed(0)
    model = backbone("mobilenetv3_small_050", num_classes=3, in_chans=3, img_size=32)
    with pytest.raises(ConfigError, match=r"hardsigmoid.*first_order=True"):
        MetaLearner(model, inner_steps=1, inner_lr=0.01).backward(_tiny_tasks())
    learner = MetaLearner(model, inner_steps=1, inner_lr=0.01, first_order=True)
    learner.backward(_tiny_tasks())
    assert all(torch.isfinite(p.grad).all() for p in learner.meta_parameters() if p.grad is not None)
