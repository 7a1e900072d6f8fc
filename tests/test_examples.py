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


def loop_diff() -> list[str]:
    before = (EXAMPLES / "supervised.py").read_text().splitlines()
    after = (EXAMPLES / "meta.py").read_text().splitlines()
    return list(difflib.unified_diff(before, after, "examples/supervised.py", "examples/meta.py", lineterm="", n=1))


@pytest.mark.parametrize("script", ["supervised.py", "meta.py", "meta_accelerate.py"])
def test_example_runs(script, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / script), "--steps", "2"], capture_output=True, text=True, cwd=tmp_path, env=env
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "step 2: loss" in proc.stdout


def test_the_training_loop_changes_by_at_most_ten_lines():
    def loop(name: str) -> list[str]:
        lines = (EXAMPLES / name).read_text().splitlines()
        return lines[lines.index("step = 0") :]

    diff = difflib.unified_diff(loop("supervised.py"), loop("meta.py"), lineterm="", n=0)
    changed = [line for line in diff if line[:1] in "+-" and not line.startswith(("+++", "---"))]
    assert 0 < len(changed) <= 10, changed


def test_docs_show_the_current_diff():
    assert "\n".join(loop_diff()) in DOC.read_text(), "regenerate the diff in docs/wrap-a-script.md"
