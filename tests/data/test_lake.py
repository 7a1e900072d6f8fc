"""Omniglot one-shot run format: written from held-out alphabets, read back, evaluated."""

from __future__ import annotations

import json
import shutil

import torch

from metaopt.cli import main
from metaopt.data.lake import read_lake_runs, write_lake_runs

HELD_OUT = ["Japanese_(katakana)", "Sanskrit", "Tagalog"]


def test_written_runs_follow_the_official_layout(tmp_path, omniglot_dir):
    manifest = write_lake_runs(omniglot_dir / "images_background_small2.zip", HELD_OUT, tmp_path, runs=4, seed=1)
    assert manifest["skipped"] == {"Tagalog": "17 characters < 20 ways"}
    run = tmp_path / "run01"
    assert len(list((run / "training").glob("class*.png"))) == 20 and len(list((run / "test").glob("item*.png"))) == 20
    lines = (run / "class_labels.txt").read_text().split()
    assert lines[0] == "run01/test/item01.png" and lines[1].startswith("run01/training/class")
    assert all(r["drawers"][0] != r["drawers"][1] for r in manifest["runs"])
    tasks = read_lake_runs(tmp_path)
    assert len(tasks) == 4
    sx, sy, qx, qy = tasks[0]
    assert sx.shape == (20, 1, 28, 28) and qx.shape == (20, 1, 28, 28)
    assert sorted(qy.tolist()) == list(range(20)) and torch.equal(sy, torch.arange(20))


def test_reader_maps_items_to_their_classes(tmp_path, omniglot_dir):
    write_lake_runs(omniglot_dir / "images_background_small2.zip", HELD_OUT, tmp_path, runs=1, seed=2)
    run = tmp_path / "run01"
    for line in (run / "class_labels.txt").read_text().splitlines():  # make each item a copy of its class
        item, label = line.split()
        shutil.copy(tmp_path / label, tmp_path / item)
    sx, sy, qx, qy = read_lake_runs(tmp_path)[0]
    assert torch.equal(qx, sx[qy])


def test_eval_reports_the_error_rate_and_refuses_a_5_way_model(tmp_path, capsys, omniglot_dir):
    runs = tmp_path / "runs"
    assert (
        main(
            ["lake-runs", "--omniglot", str(omniglot_dir / "images_background_small2.zip")]
            + [x for a in HELD_OUT for x in ("--alphabet", a)]
            + ["--out", str(runs), "--runs", "3"]
        )
        == 0
    )
    for ways in (20, 5):
        out = tmp_path / f"model{ways}"
        train = ["train", "--ways", str(ways), "--iterations", "1", "--meta-batch", "1", "--query", "1"]
        assert main([*train, "--no-progress", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "model20"), "--lake-runs", str(runs), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["runs"] == 3 and report["items"] == 60 and 0.0 <= report["error_rate"] <= 1.0
    assert abs(report["error_rate"] - sum(report["per_run_error"]) / 3) < 1e-9
    assert main(["eval", str(tmp_path / "model5"), "--lake-runs", str(runs)]) == 2
    assert "num_classes=20" in capsys.readouterr().err
