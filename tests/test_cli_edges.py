"""Issue 19's CLI and configuration edges: resume, value types, config keys, devices, seeds, names."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import tomllib
import torch

from metaopt.cli import main
from metaopt.config import TrainConfig
from metaopt.data.images import load_image_folder
from metaopt.data.sources import make_sampler
from metaopt.trainer import Trainer

SIN = ["--data", "sinusoid", "--shots", "5", "--query", "5", "--meta-batch", "2", "--no-progress"]


def test_resume_starts_from_the_saved_config_and_only_safe_keys_change(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(["train", "--out", out, *SIN, "--inner-lr", "0.02", "--iterations", "3", "--seed", "5"]) == 0
    # the README's resume command with only a longer run: every other setting comes from the run
    assert main(["train", "--out", out, "--resume", "--iterations", "5", "--no-progress"]) == 0
    saved = json.loads((Path(out) / "config.json").read_text())
    assert (saved["iterations"], saved["inner_lr"], saved["seed"], saved["data"]) == (5, 0.02, 5, "sinusoid")
    times = [json.loads(line)["time"] for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    assert len(times) == 5 and times == sorted(times)  # the clock continues across the resume
    capsys.readouterr()
    assert main(["train", "--out", out, "--resume", "--inner-lr", "0.1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "inner_lr: 0.02 -> 0.1" in err and "start a new run" in err


def test_config_values_are_coerced_to_their_declared_types(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"  # YAML 1.1 reads 1e-2 and 5e-2 as strings
    cfg.write_text(f"data: sinusoid\nshots: 5\ninner_lr: 1e-2\niterations: 2\nout: {tmp_path / 'from_file'}\n")
    assert main(["train", "--config", str(cfg), "--no-progress", "--plugin", "shot:weight=1e-6"]) == 0
    saved = json.loads((tmp_path / "from_file" / "config.json").read_text())  # `out` is a config key
    assert saved["inner_lr"] == 0.01 and isinstance(saved["inner_lr"], float)
    capsys.readouterr()
    assert main(["train", "--config", str(cfg), "--overwrite", "--no-progress", "--plugin", "shot:weight=heavy"]) == 2
    assert "'weight' must be float; got 'heavy'" in capsys.readouterr().err
    with pytest.raises(Exception, match="'ways' must be int; got 2.5"):
        TrainConfig.from_dict({"ways": 2.5})


def test_plugin_flags_add_to_the_config_file_and_replace_same_name_entries(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: sinusoid\ninner_lr: 0.01\niterations: 1\nplugins: [shot, 'sharp_maml:rho_inner=0.05']\n")
    out = tmp_path / "run"
    args = ["train", "--config", str(cfg), "--out", str(out), "--no-progress", "--plugin", "sharp_maml:rho_outer=0.05"]
    assert main(args) == 0
    assert json.loads((out / "config.json").read_text())["plugins"] == ["shot", "sharp_maml:rho_outer=0.05"]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--device", "banana"], "device='banana' must be one of"),
        (["--rotations"], "rotations=True applies to image sources"),
    ],
)
def test_settings_that_cannot_apply_are_refused(tmp_path, capsys, args, needle):
    assert main(["train", "--out", str(tmp_path / "r"), *SIN, "--inner-lr", "0.01", "--iterations", "1", *args]) == 2
    assert needle in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_on_a_cpu_machine_is_refused(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "r"), *SIN, "--inner-lr", "0.01", "--device", "cuda"]) == 2
    assert "sees no CUDA device" in capsys.readouterr().err


def test_rotations_add_rotated_classes_for_folder_data(tmp_path):
    from PIL import Image

    for c in range(5):
        (tmp_path / f"class{c}").mkdir()
        for i in range(2):
            Image.fromarray(np.full((8, 8), 40 * c + i, dtype=np.uint8)).save(tmp_path / f"class{c}" / f"{i}.png")
    assert len(load_image_folder(tmp_path, size=8)) == 5
    plain = make_sampler(f"folder:{tmp_path}", split="train", ways=2, shots=1, query=1, image_size=8)
    rotated = make_sampler(f"folder:{tmp_path}", split="train", ways=2, shots=1, query=1, image_size=8, rotations=True)
    assert len(rotated.names) == 4 * len(plain.names) == 16


def test_version_flag(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and "metaopt-torch" in capsys.readouterr().out


def test_training_seeds_python_and_numpy_too(tmp_path):
    Trainer(TrainConfig(data="sinusoid", inner_lr=0.01, seed=7), tmp_path / "run")
    drawn = (random.random(), float(np.random.rand()))
    random.seed(7)
    np.random.seed(7)
    assert drawn == (random.random(), float(np.random.rand()))


def test_the_distribution_name_is_not_the_taken_pypi_name():
    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    assert project["name"] == "metaopt-torch"
    assert project["scripts"]["metaopt"] == "metaopt.cli:main"
