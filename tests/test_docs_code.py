"""Every Python block of docs/data.md and docs/wrap-a-script.md runs as written.

The blocks of one page run in order in one namespace (as a reader pastes them), in a folder that
holds the data they name: ``data/train`` (an RGB class-per-folder set) and ``data/cub_train`` (a
Hugging Face dataset saved to disk).  The diffs of wrap-a-script.md are checked against the
examples by tests/test_examples.py, and the examples run there.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["data.md", "wrap-a-script.md"]


def python_blocks(page: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "docs" / page).read_text(), flags=re.S)


@pytest.fixture
def data_folder(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    for c in range(25):  # 20% held out must still give 5-way tasks
        folder = tmp_path / "data" / "train" / f"class{c:02d}"
        folder.mkdir(parents=True)
        for i in range(16):
            Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    datasets = pytest.importorskip("datasets", reason="Hugging Face datasets is in the test extra")
    images = [Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)) for _ in range(5 * 20)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=5)})
    hf = datasets.Dataset.from_dict({"image": images, "label": [i // 20 for i in range(100)]}, features=features)
    hf.save_to_disk(str(tmp_path / "data" / "cub_train"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_pages_have_python_blocks():
    assert all(python_blocks(page) for page in PAGES)


@pytest.mark.parametrize("page", PAGES)
def test_every_python_block_runs_as_written(page, data_folder):
    namespace: dict = {"__name__": "__docs__"}
    for number, block in enumerate(python_blocks(page), 1):
        try:
            exec(compile(block, f"docs/{page} block {number}", "exec"), namespace)
        except Exception as exc:  # name the block that broke
            raise AssertionError(f"docs/{page}, Python block {number} fails: {type(exc).__name__}: {exc}") from exc
