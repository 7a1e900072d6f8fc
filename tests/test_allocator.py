"""keep_freed_memory: fewer page faults on a free-then-allocate loop; the trainer applies it on CPU."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from metaopt import allocator
from metaopt.config import TrainConfig
from metaopt.errors import ConfigError
from metaopt.trainer import Trainer

needs_glibc = pytest.mark.skipif(allocator.glibc() is None, reason="mallopt tuning is Linux/glibc only")

# one task's life in the loop engine, reduced: a large graph built, then freed, again and again
FAULTS = """
import json, resource, sys, torch
from metaopt.allocator import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
torch.ones(1)
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
x = [torch.ones(2**20 * 16) for _ in range(8)]  # 8 x 64 MiB, then freed
del x
start = faults()
for _ in range(5):
    x = [torch.ones(2**20 * 16) for _ in range(8)]
    del x
print(json.dumps({"applied": applied, "faults": faults() - start}))
"""


def _faults(mode: str, tries: int = 3, enough: int | None = None) -> dict:
    """The fewest faults over ``tries`` fresh processes: the allocator's own count.

    The kernel can add faults to one process now and then (one CI run counted 49,152 where idle runs
    count 16,384 every time); the smallest of a few runs is the allocator's own behaviour.  Both modes
    are measured alike, so the check on the defaults (> 100,000) gets no easier.  ``enough``: stop at
    the first run with fewer faults than that (a lower count cannot come from more tries' noise).
    """
    runs = []
    for _ in range(tries):
        out = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, check=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        if enough is not None and runs[-1]["faults"] < enough:
            break
    return min(runs, key=lambda run: run["faults"])


@pytest.mark.slow
@needs_glibc
def test_keep_freed_memory_stops_refaulting_freed_blocks():
    default = _faults("default")
    kept = _faults("keep", enough=default["faults"] // 20)
    assert kept["applied"] is True
    # 5 rounds of 512 MiB: glibc's defaults mmap and unmap each 64 MiB block (~650,000 faults of 4 KiB)
    assert default["faults"] > 100_000, default
    assert kept["faults"] < default["faults"] / 20, (kept, default)


@pytest.mark.parametrize("bad", [0, 4096, 1.5, True, "64"])
def test_bad_threshold_is_refused_with_the_range(bad):
    with pytest.raises(ConfigError, match=r"threshold_mib must be an int in \[1, 2047\]"):
        allocator.keep_freed_memory(bad)


@pytest.mark.parametrize("keep", [True, False])
def test_trainer_applies_it_on_cpu_only_when_configured(tmp_path, monkeypatch, keep):
    calls = []
    monkeypatch.setattr("metaopt.trainer.keep_freed_memory", lambda: calls.append(1) or True)
    config = TrainConfig(data="sinusoid", iterations=1, meta_batch=2, device="cpu", keep_freed_memory=keep)
    Trainer(config, tmp_path / "run")
    assert calls == ([1] if keep else [])
