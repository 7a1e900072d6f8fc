"""Shared helpers of the benchmark runners: run the CLI, describe the machine, measure memory, write
pages and JSON, summarise seeds.  Every runner imports this; it imports no runner."""

from __future__ import annotations

import contextlib
import io
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "benchmarks"
SHARED_DATA = ROOT.parent / "shared" / "data" / "omniglot"


def shown(text: str) -> str:
    """``text`` with every absolute path into a ``shared/data`` folder written ``../shared/data/`` (where the
    README puts it beside the checkout): a page reads the same from a clone at any path, whatever path its
    JSON recorded; a path inside this checkout is written relative to it."""
    return re.sub(r"/[^\s:`'\"]*/shared/data/", "../shared/data/", text).replace(f"{ROOT}/", "")


def cli(args: list[str]) -> str:
    """Run ``metaopt ARGS`` in a fresh interpreter; return its stdout (raise with stderr on failure).

    With ``METAOPT_BENCH_IN_PROCESS=1`` (the unit suite's tiny runs, where starting an interpreter
    and importing torch costs more than the run) ``metaopt.cli.main`` runs in this process instead,
    with the same stdout, exit-status and error contract; measured runs never set it.
    """
    if os.environ.get("METAOPT_BENCH_IN_PROCESS") == "1":
        return _cli_in_process(args)
    cmd = [sys.executable, "-m", "metaopt.cli", *args]
    # PYTHONSAFEPATH: do not put the current folder first on sys.path, where a source checkout's
    # metaopt/ would shadow the installed package
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONSAFEPATH": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.stdout


def _cli_in_process(args: list[str]) -> str:
    from metaopt.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(args)
        except SystemExit as exc:  # argparse refusals
            code = exc.code if isinstance(exc.code, int) else 2
    if code:
        raise RuntimeError(f"metaopt {' '.join(args)} failed ({code}) in process:\n{err.getvalue()[-3000:]}")
    return out.getvalue()


def train_eval(
    out: Path,
    train_args: list[str],
    eval_steps: list[int],
    tasks: int = 600,
    eval_args: list[str] | None = None,
    train: bool = True,
) -> dict[str, Any]:
    """Train a run through the CLI (unless ``train=False``: ``out`` is trained already), then
    evaluate it at each number of inner steps."""
    start = time.perf_counter()
    if train:
        cli(["train", "--out", str(out), "--overwrite", "--no-progress", *train_args])
    wall = time.perf_counter() - start
    evals = {}
    for steps in eval_steps:
        args = ["eval", str(out), "--tasks", str(tasks), "--steps", str(steps), "--json", *(eval_args or [])]
        try:
            evals[str(steps)] = json.loads(cli(args))
        except RuntimeError as exc:  # a learned inner rate may blow up past the trained step count
            if "non-finite" not in str(exc):
                raise
            message = next(line for line in str(exc).splitlines() if "non-finite" in line)
            evals[str(steps)] = {"diverged": True, "message": message.removeprefix("metaopt: error: "), "tasks": tasks}
    return {"train_args": train_args, "train_wall_s": round(wall, 1), "evals": evals}


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU {platform.machine()} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def status_mib(field: str) -> float:
    """A memory field of /proc/self/status in MiB: "VmRSS" (resident now), "VmHWM" (its peak)."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field))
    return int(line.split()[1]) / 1024


def metric_key(report: dict[str, Any]) -> str:
    return "accuracy" if "accuracy" in report else "mse"


def fmt(report: dict[str, Any], key: str | None = None) -> str:
    if report.get("diverged"):
        return "diverged (non-finite loss)"
    key = key or metric_key(report)
    return f"{report[key]:.4f} ± {report['ci95']:.4f}"


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def summary(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def paired_difference(diffs: list[float]) -> tuple[float, float, bool]:
    """Per-seed differences to a reference: their mean, its standard error, and whether the mean lies
    beyond twice that (the harnesses' screen, not a significance test)."""
    mean, sd = summary(diffs)
    se = sd / len(diffs) ** 0.5
    return mean, se, abs(mean) > 2 * se
