"""Two CPU processes (gloo) on half a meta-batch each == one process on the whole batch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distributed_job import CONFIGS, train, train_from_loader, train_stacked

JOB = Path(__file__).resolve().parents[1] / "distributed_job.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("dist")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += ["--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(JOB), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(JOB.parent)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CONFIGS))
def test_two_processes_match_each_other_and_one_process(two_ranks, name):
    rank0, rank1 = (r[name] for r in two_ranks)
    assert int(two_ranks[0]["_world"]) == 2
    single = train(name)
    start = train(name, steps=0)
    for key in single:
        assert torch.equal(rank0[key], rank1[key]), f"{key} differs between ranks"
        torch.testing.assert_close(rank0[key], single[key], rtol=1e-9, atol=1e-11, msg=key)
    moved = max(float((single[k] - start[k]).abs().max()) for k in single)
    assert moved > 1e-3  # the steps did something, so the comparison means something


def test_a_prepared_task_loader_is_not_sliced_again(two_ranks):
    """accelerate already shards a prepared DataLoader: ``shard`` keeps each process's batch whole,
    and two processes equal one process on the whole batches (the old ``batch[rank::world]`` idiom
    would have dropped half the tasks)."""
    rank0, rank1 = (r["prepared_loader"] for r in two_ranks)
    single, start = train_from_loader(), train_from_loader(steps=0)
    for key in single:
        assert torch.equal(rank0[key], rank1[key]), key
        torch.testing.assert_close(rank0[key], single[key], rtol=1e-9, atol=1e-11, msg=key)
    assert max(float((single[k] - start[k]).abs().max()) for k in single) > 1e-3


@pytest.mark.parametrize("key", ["stacked_same_batch", "stacked_prepared"])
def test_stacked_batches_are_sharded_as_tasks(two_ranks, key):
    """A default-collated batch (four stacked tensors) was sliced field-wise at 2 processes
    (``PluginHookError ... 0D or 1D target tensor expected``); now it is split into tasks first,
    from a prepared loader (used whole) or from the same batch on every process (sliced)."""
    rank0, rank1 = (r[key] for r in two_ranks)
    single, start = train_stacked(), train_stacked(steps=0)
    for name in single:
        assert torch.equal(rank0[name], rank1[name]), name
        torch.testing.assert_close(rank0[name], single[name], rtol=1e-9, atol=1e-11, msg=name)
    assert max(float((single[k] - start[k]).abs().max()) for k in single) > 1e-3


def test_shard_without_the_loader_is_refused_with_several_processes(two_ranks):
    """``shard(batch, accelerator)`` on a prepared loader's batch used 8 of 16 tasks, silently."""
    assert int(two_ranks[0]["_refuses_missing_loader"]) == 1 and int(two_ranks[1]["_refuses_missing_loader"]) == 1
