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
from metaopt.errors import ConfigError, DataError
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
    with pytest.raises(ConfigError, match="'ways' must be int; got 2.5"):
        TrainConfig.from_dict({"ways": 2.5})


def test_plugin_flags_add_to_the_config_file_and_replace_same_name_entries(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: sinusoid\ninner_lr: 0.01\niterations: 1\nplugins: [shot, 'sharp_maml:rho_inner=0.05']\n")
    out = tmp_path / "run"
    args = ["train", "--config", str(cfg), "--out", str(out), "--no-progress", "--plugin", "sharp_maml:rho_outer=0.05"]
    assert main(args) == 0
    assert json.loads((out / "config.json").read_text())["plugins"] == ["shot", "sharp_maml:rho_outer=0.05"]


def test_settings_that_cannot_apply_are_refused(tmp_path, capsys):
    args = ["train", "--out", str(tmp_path / "r"), *SIN, "--iterations", "1"]
    assert main([*args, "--rotations"]) == 2
    assert "rotations=True applies to image sources" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:  # a flag: argparse lists the choices
        main([*args, "--device", "banana"])
    assert info.value.code == 2 and "invalid choice: 'banana'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="device='banana' must be one of"):  # a config file: the same rule
        TrainConfig.from_dict({"device": "banana"})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_on_a_cpu_machine_is_refused(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "r"), *SIN, "--inner-lr", "0.01", "--device", "cuda"]) == 2
    assert "sees no CUDA device" in capsys.readouterr().err


def test_rotations_add_rotated_classes_for_folder_data(tmp_path):
    from PIL import Image

    for c in range(5):
        (tmp_path / f"class{c}").mkdir()
        for i in range(2):
            ramp = (np.arange(64).reshape(8, 8) * 2 + 40 * c + i).astype(np.uint8)  # rotations are visible
            Image.fromarray(ramp).save(tmp_path / f"class{c}" / f"{i}.png")
    assert len(load_image_folder(tmp_path, size=8)) == 5  # 4 training classes, 1 test class
    with pytest.raises(DataError, match="ways=5 is larger than the 4 classes"):
        make_sampler(f"folder:{tmp_path}", split="train", ways=5, shots=1, query=1, image_size=8)
    rotated = make_sampler(f"folder:{tmp_path}", split="train", ways=16, shots=1, query=1, image_size=8, rotations=True)
    task = rotated.sample(1)[0]  # 4 classes x 4 rotations
    assert task.support_x.shape[0] == 16
    assert len({x.flatten().tolist().__repr__() for x in task.support_x}) == 16


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


def test_sinusoid_gets_its_own_default_inner_lr():
    assert TrainConfig(data="sinusoid").inner_lr == 0.01 and TrainConfig().inner_lr == 0.4
    assert TrainConfig(data="sinusoid", inner_lr=0.05).inner_lr == 0.05


def test_training_feedback_running_means_best_eval_and_one_eval_sampler(tmp_path, capsys, monkeypatch):
    import metaopt.trainer as trainer_module

    built = []
    real = trainer_module.make_eval_sampler
    monkeypatch.setattr(trainer_module, "make_eval_sampler", lambda *a, **k: built.append(1) or real(*a, **k))
    out = tmp_path / "run"
    args = ["train", "--out", str(out), *SIN, "--iterations", "4", "--eval-every", "2", "--eval-tasks", "4"]
    assert main(args) == 0
    printed = capsys.readouterr()
    assert len(built) == 1  # built once at start, not re-read for every periodic eval
    assert "eval @ 2: mse" in printed.err + printed.out and "eval @ 4: mse" in printed.err + printed.out
    assert "mean of the last 4:" in printed.out and "best eval @" in printed.out
    evals = [json.loads(x)["eval"] for x in (out / "metrics.jsonl").read_text().splitlines() if "eval" in x]
    assert len(evals) == 2


def test_test_split_that_cannot_make_tasks_fails_before_step_1(tmp_path, capsys, omniglot_dir):
    archive = str(omniglot_dir / "images_background_small1.zip")
    args = ["train", "--out", str(tmp_path / "r"), "--data", f"omniglot:{archive}", "--ways", "60", "--no-progress"]
    assert main([*args, "--test-alphabet", "Balinese", "--iterations", "1", "--eval-every", "1"]) == 2
    assert "test split cannot make evaluation tasks: ways=60 is larger than the 24 classes" in capsys.readouterr().err
    assert not (tmp_path / "r" / "metrics.jsonl").exists()  # no training step ran


def test_eval_can_skip_the_baseline_and_change_ways(tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        main(["train", "--out", str(out), "--iterations", "1", "--meta-batch", "2", "--query", "2", "--no-progress"])
        == 0
    )
    capsys.readouterr()
    assert main(["eval", str(out), "--tasks", "3", "--json", "--no-baseline", "--ways", "3", "--no-progress"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert "unadapted" not in report and report["tasks"] == 3


def test_overwrite_clears_old_tracker_event_files(tmp_path):
    run = tmp_path / "run"
    (run / "metaopt").mkdir(parents=True)
    (run / "metaopt" / "events.out.tfevents.old").write_text("stale")
    (run / "config.json").write_text("{}")
    Trainer(TrainConfig(data="sinusoid", iterations=1), run, overwrite=True)
    assert not (run / "metaopt" / "events.out.tfevents.old").exists()


def test_plugins_command_lists_options_with_defaults(capsys):
    assert main(["plugins"]) == 0
    assert "options: weight=0.1, form='auto'" in capsys.readouterr().out


def test_engine_auto_says_which_engine_ran(tmp_path, capsys):
    """--engine auto never said which engine ran: now the summary, every metrics line and config.json do."""
    out = tmp_path / "run"
    args = ["train", "--data", "sinusoid", "--engine", "auto", "--meta-batch", "2", "--iterations", "2"]
    assert main([*args, "--no-progress", "--out", str(out)]) == 0
    assert "on the vmap engine (chosen by --engine auto)" in capsys.readouterr().out
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["engine"] for r in records if "meta_loss" in r] == ["vmap", "vmap"]
    saved = json.loads((out / "config.json").read_text())
    assert saved["engine"] == "auto" and saved["engine_chosen"] == "vmap"
    assert main([*args, "--no-progress", "--out", str(out), "--resume", "--iterations", "3"]) == 0  # still resumes
    conv = tmp_path / "conv"
    assert (
        main(
            [
                "train",
                "--engine",
                "auto",
                "--meta-batch",
                "1",
                "--iterations",
                "1",
                "--query",
                "1",
                "--no-progress",
                "--out",
                str(conv),
            ]
        )
        == 0
    )
    assert json.loads((conv / "config.json").read_text())["engine_chosen"] == "loop"


def test_help_names_each_default_once():
    """--help printed '(default: ...) (default: None)' for flags whose help already named the default."""
    from metaopt.cli import build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, __import__("argparse")._SubParsersAction))
    for name, sub in subparsers.choices.items():
        for action in sub._actions:
            assert (action.help or "").count("(default:") <= 1, (name, action.dest, action.help)
