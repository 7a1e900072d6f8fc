"""The trainer under faults: kills, signals, NaNs, clipping (CPU, sinusoid, tiny settings)."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch
from conftest import OUTSIDE

from metaopt.checkpoint import load_safe
from metaopt.config import TrainConfig
from metaopt.errors import NumericalError
from metaopt.hookspecs import hookimpl
from metaopt.registry import register_plugin
from metaopt.trainer import Trainer

ITERATIONS = 60
TRAIN_ARGS = ["--data", "sinusoid", "--shots", "5", "--query", "5", "--inner-lr", "0.01", "--meta-batch", "4"]
TRAIN_ARGS += ["--iterations", str(ITERATIONS), "--checkpoint-every", "1", "--keep-checkpoints", "2", "--seed", "7"]
TRAIN_ARGS += ["--plugin", "sharp_maml:rho_inner=0.05", "--no-progress"]


def _cli(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "metaopt.cli", "train", "--out", str(out), *TRAIN_ARGS, *extra]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def _final_state(run: Path) -> dict:
    found = sorted((run / "checkpoints").glob("ckpt-*.pt"))
    return load_safe(found[-1])


def _assert_bit_identical(a: dict, b: dict) -> None:
    assert a["iteration"] == b["iteration"] == ITERATIONS
    assert a["learner"].keys() == b["learner"].keys()
    for name in a["learner"]:
        assert torch.equal(a["learner"][name], b["learner"][name]), name
    for pid, st in a["optimizer"]["state"].items():
        for key, value in st.items():
            assert torch.equal(value, b["optimizer"]["state"][pid][key]), (pid, key)


def _lines(path: Path) -> int:
    try:
        return len(path.read_text().splitlines())
    except FileNotFoundError:
        return 0


def _start_and_signal(out: Path, sig: int, after: int) -> subprocess.CompletedProcess:
    proc = subprocess.Popen(
        _cli(out), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=OUTSIDE
    )
    deadline = time.time() + 120
    while _lines(out / "metrics.jsonl") < after and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("straight") / "run"
    subprocess.run(_cli(out), env=_env(), check=True, capture_output=True, cwd=OUTSIDE)
    return _final_state(out)


@pytest.mark.slow
def test_sigkill_at_a_random_iteration_then_resume_is_bit_identical(tmp_path, uninterrupted):
    seed = random.randrange(1 << 30)
    after = random.Random(seed).randint(3, 30)
    out = tmp_path / "run"
    killed = _start_and_signal(out, signal.SIGKILL, after)
    assert killed.returncode == -signal.SIGKILL, f"seed {seed}: the run ended before the kill"
    assert _final_state(out)["iteration"] < ITERATIONS
    subprocess.run(_cli(out, "--resume"), env=_env(), check=True, capture_output=True, cwd=OUTSIDE)
    _assert_bit_identical(_final_state(out), uninterrupted)
    logged = [json.loads(line)["iteration"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, ITERATIONS + 1)), "metrics after the checkpoint must not be duplicated"


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_and_exits_nonzero_then_resumes(tmp_path, uninterrupted):
    out = tmp_path / "run"
    stopped = _start_and_signal(out, signal.SIGTERM, 5)
    assert stopped.returncode == 128 + signal.SIGTERM
    assert "SIGTERM" in stopped.stderr and "--resume" in stopped.stderr
    state = _final_state(out)
    assert 5 <= state["iteration"] < ITERATIONS
    assert _lines(out / "metrics.jsonl") == state["iteration"]  # the checkpoint covers every logged step
    subprocess.run(_cli(out, "--resume"), env=_env(), check=True, capture_output=True, cwd=OUTSIDE)
    _assert_bit_identical(_final_state(out), uninterrupted)


class NanAt:
    """Test plugin: turns task 1's query loss into NaN at one iteration."""

    name = "nan_at"

    def __init__(self, iteration: int = 5) -> None:
        self.iteration = iteration

    @hookimpl(wrapper=True)
    def outer_loss(self, task, params):
        loss = yield
        if task.training and task.learner.iteration + 1 == self.iteration and task.index == 1:
            return loss * float("nan")
        return loss


register_plugin("nan_at", NanAt, "test plugin")


def _config(**overrides) -> TrainConfig:
    values = dict(data="sinusoid", shots=5, query=5, inner_lr=0.01, meta_batch=3, iterations=8, checkpoint_every=2)
    return TrainConfig.from_dict({**values, **overrides})


def test_nan_names_iteration_task_hook_and_last_checkpoint(tmp_path):
    trainer = Trainer(_config(plugins=["nan_at:iteration=5"]), tmp_path / "run")
    with pytest.raises(NumericalError) as info:
        trainer.train(progress=False)
    message = str(info.value)
    for needle in ("iteration 5", "task 1", "'outer_loss'", "nan_at", "ckpt-00000004.pt"):
        assert needle in message, needle
    assert (info.value.iteration, info.value.task, info.value.hook) == (5, 1, "outer_loss")
    state = load_safe(tmp_path / "run" / "checkpoints" / "ckpt-00000004.pt")
    assert state["iteration"] == 4
    assert all(torch.isfinite(t).all() for t in state["learner"].values())


def test_skip_option_counts_and_logs_the_bad_batch(tmp_path):
    run = tmp_path / "run"
    trainer = Trainer(_config(plugins=["nan_at:iteration=5"], on_nonfinite="skip"), run)
    trainer.train(progress=False)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    skipped = [r for r in records if "skipped" in r]
    assert [r["iteration"] for r in skipped] == [5] and "task 1" in skipped[0]["skipped"]
    assert len(records) == 8
    state = load_safe(sorted((run / "checkpoints").glob("*.pt"))[-1])
    assert state["skipped"] == 1 and state["iteration"] == 8
    assert all(torch.isfinite(t).all() for t in state["learner"].values())


def test_outer_gradient_clipping_caps_the_update(tmp_path):
    cap = 1e-3
    trainer = Trainer(_config(iterations=1, outer_optimizer="sgd", meta_lr=1.0, clip_grad_norm=cap), tmp_path / "r")
    before = [p.detach().clone() for p in trainer.learner.meta_parameters()]
    trainer.train(progress=False)
    moved = math.sqrt(
        sum(float((p.detach() - b).pow(2).sum()) for p, b in zip(trainer.learner.meta_parameters(), before))
    )
    logged = json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[0])
    assert logged["grad_norm"] > 10 * cap  # the raw gradient was much larger ...
    assert moved == pytest.approx(cap, rel=1e-4)  # ... and the step was cut to the cap


def test_resume_drops_log_lines_written_after_the_checkpoint(tmp_path):
    run = tmp_path / "run"
    Trainer(_config(iterations=4), run).train(progress=False)
    with open(run / "metrics.jsonl", "a") as fh:  # what a kill between log and checkpoint leaves
        fh.write(json.dumps({"iteration": 5, "meta_loss": 1.0}) + "\n")
    trainer = Trainer(_config(iterations=4), run, resume=True)
    assert trainer.iteration == 4
    assert [json.loads(x)["iteration"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_tensorboard_tracker_gets_the_metrics(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is in the test extra; pip install tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    Trainer(_config(iterations=3, log_with=["tensorboard"]), run).train(progress=False)
    events = list(run.rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file written"
    tags = set()
    for event_file in events:
        acc = EventAccumulator(str(event_file))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    assert "meta_loss" in tags and "query_loss" in tags


def test_unknown_or_missing_tracker_is_a_config_error(tmp_path):
    from metaopt.errors import ConfigError

    with pytest.raises(ConfigError, match="'tensorbord'.*'tensorboard'"):
        Trainer(_config(log_with=["tensorbord"]), tmp_path / "r")


def test_evaluate_reports_the_median_beside_the_mean():
    """One blown-up task makes the mean MSE its own value; the median says what a typical task does."""
    from metaopt.trainer import describe_report, evaluate

    class Fixed:
        eval_inner_steps = 1
        losses = iter([[0.1, 0.3, 1e6], [0.2, 0.4]])

        def evaluate(self, tasks, steps=None):
            values = next(self.losses)
            return types.SimpleNamespace(per_task={"query_loss": values})

    class Sampler:
        def sample(self, n):
            return [None] * n

    report = evaluate(Fixed(), Sampler(), tasks=5, batch=3)
    assert report["query_loss_median"] == 0.3 and report["mse"] > 2e5
    assert describe_report(report).endswith("over 5 tasks (median over tasks 0.3000)")
