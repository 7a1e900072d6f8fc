"""Checkpoint files: atomic writes, safe loading, refusal of tampered or foreign files."""

from __future__ import annotations

import pickle

import pytest
import torch
import torch.nn.functional as F
from conftest import regression_tasks

from metaopt import MetaLearner
from metaopt.checkpoint import load_safe, save_atomic
from metaopt.errors import CheckpointError
from metaopt.models import mlp
from metaopt.trainer import restore_learner


class _Exploit:
    """Unpickling this calls ``open(marker, 'w')``: a stand-in for arbitrary code."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pickle_does_not_execute(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "ckpt.pt"
    torch.save({"learner": {}, "payload": _Exploit(str(marker))}, path)
    with pytest.raises(CheckpointError, match="refused for safety"):
        load_safe(path)
    assert not marker.exists()
    # the same bytes really do run code under an unsafe loader (so the test can fail)
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_plain_pickle_file_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "ckpt.pt"
    path.write_bytes(pickle.dumps(_Exploit(str(marker)), protocol=2))
    with pytest.raises(CheckpointError, match=str(path)):
        load_safe(path)
    assert not marker.exists()


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    path = save_atomic({"w": torch.ones(1000)}, tmp_path / "ckpt.pt")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_safe(path)


def test_failed_write_keeps_the_previous_file_and_leaves_no_temp(tmp_path):
    path = save_atomic({"w": torch.zeros(3)}, tmp_path / "ckpt.pt")

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full (simulated)")

    with pytest.raises(RuntimeError, match="disk full"):
        save_atomic({"w": torch.ones(3), "x": Unpicklable()}, path)
    assert torch.equal(load_safe(path)["w"], torch.zeros(3))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_checkpoint_of_another_model_or_plugin_set_is_refused(tmp_path):
    source = MetaLearner(mlp(hidden=(40, 40)), ["hypermaml"], loss_fn=F.mse_loss)
    path = save_atomic({"learner": source.state_dict(), "plugin_state": source.plugin_state()}, tmp_path / "c.pt")
    state = load_safe(path)
    other_model = MetaLearner(mlp(hidden=(20,)), ["hypermaml"], loss_fn=F.mse_loss)
    with pytest.raises(CheckpointError, match="does not fit this model/plugin set"):
        restore_learner(other_model, state, path)
    no_plugin = MetaLearner(mlp(hidden=(40, 40)), loss_fn=F.mse_loss)
    with pytest.raises(CheckpointError, match=str(path)):
        restore_learner(no_plugin, state, path)
    # the matching learner loads it and computes the same thing
    twin = MetaLearner(mlp(hidden=(40, 40)), ["hypermaml"], loss_fn=F.mse_loss)
    restore_learner(twin, state, path)
    tasks = regression_tasks(2, dtype=torch.float32)
    assert torch.equal(source.evaluate(tasks).loss, twin.evaluate(tasks).loss)
