"""A third-party plugin distribution: built, installed, listed, used by name, never on by default."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import OUTSIDE

PLUGIN_SOURCE = '''
import torch
import metaopt


class CountSteps:
    """Counts inner steps per task and logs the count (third-party test plugin)."""

    name = "count_steps"

    def __init__(self, scale: float = 1.0):
        self.scale = scale

    @metaopt.hookimpl
    def after_inner_step(self, task, trajectory, params):
        task.metrics["counted_steps"] = torch.tensor(float(trajectory.k + 1) * self.scale)
'''


def _build_wheel(folder: Path) -> Path:
    """A minimal PEP 427 wheel declaring the ``metaopt.plugins`` entry point."""
    dist = "metaopt_count_steps-0.1.dist-info"
    files = {
        "metaopt_count_steps.py": PLUGIN_SOURCE,
        f"{dist}/METADATA": "Metadata-Version: 2.1\nName: metaopt-count-steps\nVersion: 0.1\n",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        f"{dist}/entry_points.txt": "[metaopt.plugins]\ncount_steps = metaopt_count_steps:CountSteps\n",
    }
    record = []
    for name, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(text.encode())}")
    record.append(f"{dist}/RECORD,,")
    files[f"{dist}/RECORD"] = "\n".join(record) + "\n"
    wheel = folder / "metaopt_count_steps-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for name, text in files.items():
            zf.writestr(name, text)
    return wheel


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("third_party")
    wheel = _build_wheel(root)
    target = root / "site"
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", str(target), str(wheel)]
    subprocess.run(cmd, check=True, capture_output=True)
    return target


def _metaopt(site: Path, *args: str, disable: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    env.pop("METAOPT_DISABLE_ENTRY_POINTS", None)
    if disable:
        env["METAOPT_DISABLE_ENTRY_POINTS"] = "1"
    cmd = [sys.executable, "-m", "metaopt.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=OUTSIDE)


def test_installed_plugin_is_listed_and_can_be_disabled(site):
    listed = json.loads(_metaopt(site, "plugins", "--json").stdout)
    assert listed["count_steps"].startswith("Counts inner steps")
    hidden = json.loads(_metaopt(site, "plugins", "--json", disable=True).stdout)
    assert "count_steps" not in hidden and "shot" in hidden


def test_installed_plugin_is_used_by_name_only_when_asked(site, tmp_path):
    train = ["train", "--data", "sinusoid", "--shots", "5", "--inner-lr", "0.01", "--inner-steps", "3"]
    train += ["--meta-batch", "2", "--iterations", "2", "--no-progress"]
    asked = _metaopt(site, *train, "--plugin", "count_steps:scale=2", "--out", str(tmp_path / "a"))
    assert asked.returncode == 0, asked.stderr
    record = json.loads((tmp_path / "a" / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["counted_steps"] == 6.0  # 3 steps x scale 2: the plugin ran with its option
    batched = _metaopt(
        site, *train, "--plugin", "count_steps:scale=2", "--engine", "vmap", "--out", str(tmp_path / "v")
    )
    assert batched.returncode == 0, batched.stderr  # the same plugin under the batched-task engine
    assert json.loads((tmp_path / "v" / "metrics.jsonl").read_text().splitlines()[-1])["counted_steps"] == 6.0
    plain = _metaopt(site, *train, "--out", str(tmp_path / "b"))
    assert plain.returncode == 0, plain.stderr
    assert "counted_steps" not in json.loads((tmp_path / "b" / "metrics.jsonl").read_text().splitlines()[-1])
    wrong = _metaopt(site, *train, "--plugin", "count_steps:scal=2", "--out", str(tmp_path / "c"))
    assert wrong.returncode == 2 and "'scale'" in wrong.stderr
