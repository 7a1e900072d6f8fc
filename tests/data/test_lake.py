"""Omniglot one-shot run format: written from held-out alphabets, read back, evaluated."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from conftest import class_tasks, image_tasks

from metaopt import MetaLearner
from metaopt.cli import main
from metaopt.data.lake import (
    lake_ensemble_errors,
    lake_errors,
    read_lake_runs,
    read_lake_runs_per_member,
    write_lake_runs,
)
from metaopt.errors import ConfigError
from metaopt.models import conv4
from metaopt.task import TaskData

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
    at28, again, at14 = read_lake_runs_per_member(tmp_path, [28, 28, 14])  # one read per size
    assert at28 is again and at14[0].support_x.shape[-1] == 14 and torch.equal(at28[0].query_x, qx)


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
    model20 = str(tmp_path / "model20")
    assert main(["eval", model20, "--lake-runs", str(runs), "--ensemble", model20, "--json"]) == 0
    twice = json.loads(capsys.readouterr().out)  # two identical members decide as one
    assert twice["members"] == [model20, model20] and twice["per_run_error"] == report["per_run_error"]
    assert main(["eval", model20, "--ensemble", model20]) == 2
    err = capsys.readouterr().err
    assert "--ensemble" in err and "needs --lake-runs" in err
    ckpt = str(sorted((tmp_path / "model20" / "checkpoints").glob("ckpt-*.pt"))[-1])
    assert main(["eval", model20, "--lake-runs", str(runs), "--ensemble", model20, "--checkpoint", ckpt]) == 2
    assert "is one run's file; with --ensemble give latest or best" in capsys.readouterr().err


@pytest.mark.parametrize("plugins", [[], ["proto_head"]])
def test_an_ensemble_of_one_scores_as_evaluate_does(plugins):
    torch.manual_seed(0)
    learner = MetaLearner(conv4(num_classes=5).double(), inner_steps=1, inner_lr=0.4, plugins=plugins)
    tasks = [TaskData(*t) for t in image_tasks(n=3, ways=5, query=4)]
    for steps in (0, 1):
        assert lake_ensemble_errors([learner], tasks, steps) == lake_errors(learner, tasks, steps)


def test_an_ensemble_votes_with_its_members_mean_probabilities():
    """Against a by-hand computation: each member takes one SGD step on its support loss, then the
    softmax probabilities of the adapted linear models are averaged."""
    torch.manual_seed(1)
    models = [torch.nn.Linear(4, 3).double() for _ in range(3)]
    learners = [MetaLearner(m, inner_steps=1, inner_lr=0.5) for m in models]
    tasks = [TaskData(*t) for t in class_tasks(n=6, seed=3)]
    for steps in (0, 1):
        wrong, per_run = 0, []
        for sx, sy, qx, qy in tasks:
            probs = 0
            for m in models:
                w, b = m.weight, m.bias
                if steps:
                    gw, gb = torch.autograd.grad(F.cross_entropy(F.linear(sx, w, b), sy), [w, b])
                    w, b = w - 0.5 * gw, b - 0.5 * gb
                probs = probs + F.linear(qx, w, b).softmax(dim=1)
            errors = int((probs.argmax(dim=1) != qy).sum())
            wrong += errors
            per_run.append(errors / len(qy))
        assert lake_ensemble_errors(learners, tasks, steps) == (wrong, 9 * len(tasks), per_run)
        if steps:
            assert any(lake_errors(one, tasks, steps)[2] != per_run for one in learners)  # not one member's vote


def test_an_ensemble_refuses_mismatched_task_lists():
    learner = MetaLearner(torch.nn.Linear(4, 3).double(), inner_steps=1, inner_lr=0.5)
    tasks = [TaskData(*t) for t in class_tasks(n=2)]
    with pytest.raises(ConfigError, match="at least one learner"):
        lake_ensemble_errors([], tasks)
    with pytest.raises(ConfigError, match="lengths \\[2, 1\\]"):
        lake_ensemble_errors([learner, learner], [tasks, tasks[:1]])
