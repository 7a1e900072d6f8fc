"""Every recipe in recipes/ runs from a clean checkout (2 iterations, small batches)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from metaopt.cli import main

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


def test_there_are_recipes():
    assert {p.stem for p in RECIPES} >= {"sinusoid_maml", "omniglot_5way_1shot_maml", "omniglot_20way_1shot_maml"}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_runs_two_iterations(recipe, tmp_path, monkeypatch, capsys):
    data = yaml.safe_load(recipe.read_text())["data"]
    if data.startswith("omniglot:") and not (ROOT / data.split(":", 1)[1]).is_file():
        pytest.skip(f"{data.split(':', 1)[1]} not found (../shared/data/omniglot beside the checkout)")
    monkeypatch.chdir(ROOT)  # recipes name data relative to the checkout
    args = ["train", "--config", str(recipe), "--out", str(tmp_path / "run"), "--iterations", "2"]
    args += ["--meta-batch", "2", "--eval-tasks", "2", "--no-progress"]
    assert main(args) == 0, capsys.readouterr().err
