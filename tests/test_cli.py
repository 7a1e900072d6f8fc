"""The command line end to end on tiny settings (the long runs are in docs/)."""

from __future__ import annotations

import json

import pytest

from metaopt.cli import main


def test_plugins_command_lists_builtins(capsys):
    assert main(["plugins", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert "shot" in listed and "hypermaml" in listed


def test_train_then_eval_glyphs_json(tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        main(["train", "--out", str(out), "--iterations", "3", "--meta-batch", "2", "--query", "2", "--no-progress"])
        == 0
    )
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3 and "meta_loss" in json.loads(lines[-1])
    capsys.readouterr()
    assert main(["eval", str(out), "--tasks", "4", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {"accuracy", "ci95", "tasks"} <= set(report) and report["tasks"] == 4
    # the run directory is protected
    assert main(["train", "--out", str(out), "--iterations", "1"]) == 2
    assert "--resume" in capsys.readouterr().err


def test_train_from_config_file_with_flag_override(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: sinusoid\nshots: 5\ninner_lr: 0.01\niterations: 2\nmeta_batch: 3\n")
    out = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--iterations", "4", "--out", str(out), "--no-progress"]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["iterations"] == 4 and saved["shots"] == 5
    capsys.readouterr()
    assert main(["eval", str(out), "--tasks", "5", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert "mse" in report and "query_loss_median" in report
    assert main(["eval", str(out), "--tasks", "5", "--no-progress"]) == 0
    assert f"median over tasks {report['query_loss_median']:.4f}" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--plugin", "shoot"], "'shot'"),
        (["--model", "resnet10x"], "resnet10t"),
        (["--data", "omniglot:/no/such.zip"], "/no/such.zip"),
        (["--ways", "30", "--data", "sinusoid", "--inner-lr", "-1"], "inner_lr=-1"),
    ],
)
def test_bad_input_gives_clear_errors(tmp_path, capsys, args, needle):
    assert main(["train", "--out", str(tmp_path / "r"), "--iterations", "1", *args]) == 2
    assert needle in capsys.readouterr().err


def test_unknown_config_key_suggests(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("inner_step: 3\n")
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "r")]) == 2
    assert "inner_steps" in capsys.readouterr().err


def test_omniglot_too_many_ways_is_a_clear_error(tmp_path, capsys, omniglot_dir):
    data = f"omniglot:{omniglot_dir / 'images_background_small1.zip'}"
    assert main(["train", "--data", data, "--ways", "500", "--out", str(tmp_path / "r"), "--iterations", "1"]) == 2
    assert "ways=500" in capsys.readouterr().err
    assert main(["train", "--data", data, "--shots", "10", "--query", "15", "--out", str(tmp_path / "r2")]) == 2
    assert "shots + query = 25" in capsys.readouterr().err


def test_omniglot_conv4_runs_end_to_end(tmp_path, capsys, omniglot_dir):
    data = f"omniglot:{omniglot_dir / 'images_background_small1.zip'}"
    out = tmp_path / "omni"
    assert (
        main(
            [
                "train",
                "--data",
                data,
                "--iterations",
                "2",
                "--meta-batch",
                "2",
                "--query",
                "3",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["eval", str(out), "--tasks", "4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tasks"] == 4
