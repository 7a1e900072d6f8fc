"""RGB image folders keep their colour; pretrained ImageNet checkpoints load through timm."""

from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from metaopt.cli import main
from metaopt.config import TrainConfig
from metaopt.data.images import detect_channels
from metaopt.errors import ConfigError
from metaopt.integrations.timm import backbone
from metaopt.trainer import Trainer


def _folder(root, colour: bool, classes: int = 5, per_class: int = 3):
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            grey = rng.integers(0, 255, (12, 12), dtype=np.uint8)
            pixels = rng.integers(0, 255, (12, 12, 3), dtype=np.uint8) if colour else np.stack([grey] * 3, -1)
            Image.fromarray(pixels).save(root / f"c{c}" / f"{i}.png")  # grey content saved as RGB files too
    return root


def test_channels_are_detected_from_the_images(tmp_path):
    assert detect_channels(_folder(tmp_path / "rgb", colour=True)) == 3
    assert detect_channels(_folder(tmp_path / "grey", colour=False)) == 1


def test_an_rgb_folder_trains_on_three_channels(tmp_path):
    data = _folder(tmp_path / "rgb", colour=True, classes=10)
    config = TrainConfig(data=f"folder:{data}", ways=2, query=1, image_size=16, meta_batch=1, iterations=1)
    trainer = Trainer(config, tmp_path / "run")
    assert config.channels == 3 and trainer.model.body[0][0].in_channels == 3
    assert trainer.sampler.sample(1)[0].support_x.shape[1] == 3
    trainer.train(progress=False)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["channels"] == 3
    with pytest.raises(ConfigError, match="channels=2 must be 1 or 3"):
        TrainConfig(channels=2).validate()


def test_an_imagenet_checkpoint_loads_through_timm_and_normalises_the_data(tmp_path):
    imagenet_like = timm.create_model("resnet10t", num_classes=1000, in_chans=3)
    path = tmp_path / "resnet10t.pth"
    torch.save(imagenet_like.state_dict(), path)
    model = backbone("resnet10t", num_classes=5, in_chans=1, img_size=28, pretrained_path=path)
    conv = model.body.conv1[0].weight  # timm summed the RGB filters for one input channel
    torch.testing.assert_close(conv, imagenet_like.conv1[0].weight.sum(1, keepdim=True))
    data = _folder(tmp_path / "grey", colour=False, classes=10)
    out = tmp_path / "run"
    args = ["train", "--out", str(out), "--data", f"folder:{data}", "--model", "resnet10t", "--ways", "2"]
    args += ["--query", "1", "--image-size", "12", "--meta-batch", "1", "--iterations", "1", "--no-progress"]
    assert main([*args, "--pretrained-path", str(path), "--inner-lr", "0.01"]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["normalize"] is True and saved["channels"] == 1
    saved.pop("engine_chosen")  # recorded by the run, not a setting
    trainer = Trainer(TrainConfig(**{**saved, "iterations": 1}), tmp_path / "again")
    images = torch.cat([t.support_x for t in trainer.sampler.sample(4)])
    assert images.min() < -1.0  # (x - 0.449) / 0.226 for x in [0, 1]: ImageNet statistics applied


def test_the_library_folder_loader_uses_the_clis_channel_rule(tmp_path):
    """load_image_folder returned 1 channel for RGB images while metaopt train --data folder: used 3."""
    from metaopt.data import load_image_folder

    rgb = load_image_folder(_folder(tmp_path / "rgb", colour=True), size=12)
    grey = load_image_folder(_folder(tmp_path / "grey", colour=False), size=12)
    assert next(iter(rgb.values())).shape == (3, 3, 12, 12)
    assert next(iter(grey.values())).shape == (3, 1, 12, 12)
    forced = load_image_folder(tmp_path / "rgb", size=12, channels=1)
    assert next(iter(forced.values())).shape == (3, 1, 12, 12)


def test_a_folder_nested_one_level_too_deep_names_the_fix(tmp_path, capsys):
    """root/train/<classes> reported '1 classes available' with no hint."""
    _folder(tmp_path / "root" / "train", colour=False, classes=6)
    args = ["train", "--data", f"folder:{tmp_path / 'root'}", "--out", str(tmp_path / "run"), "--no-progress"]
    assert main([*args, "--iterations", "1"]) == 2
    err = capsys.readouterr().err
    assert "ways=5 is larger than the 1 classes" in err and f"use --data folder:{tmp_path / 'root' / 'train'}" in err
