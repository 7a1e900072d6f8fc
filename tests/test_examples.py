"""The examples run (a few steps each), and the documented plain -> meta diff is the real one."""

from __future__ import annotations

import difflib
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
DOC = ROOT / "docs" / "wrap-a-script.md"


PAIRS = [
    ("supervised.py", "meta.py"),
    ("lightning_plain.py", "lightning_meta.py"),
    ("hf_trainer_plain.py", "hf_trainer_meta.py"),
]


def loop_diff(before_name: str = "supervised.py", after_name: str = "meta.py") -> list[str]:
    before = (EXAMPLES / before_name).read_text().splitlines()
    after = (EXAMPLES / after_name).read_text().splitlines()
    return list(
        difflib.unified_diff(before, after, f"examples/{before_name}", f"examples/{after_name}", lineterm="", n=1)
    )


def _changed(before: list[str], after: list[str]) -> list[str]:
    diff = difflib.unified_diff(before, after, lineterm="", n=0)
    return [line for line in diff if line[:1] in "+-" and not line.startswith(("+++", "---"))]


SCRIPTS = ["supervised.py", "meta.py", "meta_accelerate.py", "lightning_plain.py", "lightning_meta.py"]
SCRIPTS += ["hf_trainer_plain.py", "hf_trainer_meta.py"]


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_example_runs(script, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / script), "--steps", "2"], capture_output=True, text=True, cwd=tmp_path, env=env
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "step 2: loss" in proc.stdout


@pytest.mark.slow
def test_the_documented_two_process_cpu_launch_starts_two_processes(tmp_path):
    """meta_accelerate.py's docstring gave `accelerate launch --cpu --num_processes 2`, which starts one."""
    import shlex
    import socket

    doc = (EXAMPLES / "meta_accelerate.py").read_text().split('"""')[1]
    line = next(row for row in doc.splitlines() if "2 CPU processes" in row).split("#")[0]
    env_part, command = line.split(" torchrun ", 1)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    args = shlex.split(command)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--master_addr", "127.0.0.1", "--master_port", str(port)]
    cmd += [*args[:-1], str(ROOT / args[-1]), "--steps", "2"]
    key, value = env_part.split("=")
    env = {**os.environ, "OMP_NUM_THREADS": "1", key: value}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "(2 process(es)" in proc.stdout


def test_the_training_loop_changes_by_at_most_ten_lines():
    def loop(name: str) -> list[str]:
        lines = (EXAMPLES / name).read_text().splitlines()
        return lines[lines.index("step = 0") :]

    diff = difflib.unified_diff(loop("supervised.py"), loop("meta.py"), lineterm="", n=0)
    changed = [line for line in diff if line[:1] in "+-" and not line.startswith(("+++", "---"))]
    assert 0 < len(changed) <= 10, changed


@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: p[1])
def test_docs_show_the_current_diff(pair):
    assert "\n".join(loop_diff(*pair)) in DOC.read_text(), "regenerate the diffs in docs/wrap-a-script.md"


def test_the_lightning_module_changes_by_at_most_ten_lines():
    def module(name: str) -> list[str]:
        lines = (EXAMPLES / name).read_text().splitlines()
        start = next(i for i, line in enumerate(lines) if line.startswith("class Classifier"))
        return lines[start : lines.index("parser = argparse.ArgumentParser()")]

    changed = _changed(module("lightning_plain.py"), module("lightning_meta.py"))
    assert 0 < len(changed) <= 10, changed


def test_the_trainer_script_changes_by_at_most_ten_lines():
    def body(name: str) -> list[str]:  # everything after the imports
        lines = (EXAMPLES / name).read_text().splitlines()
        return lines[lines.index("parser = argparse.ArgumentParser()") :]

    changed = _changed(body("hf_trainer_plain.py"), body("hf_trainer_meta.py"))
    assert 0 < len(changed) <= 10, changed
