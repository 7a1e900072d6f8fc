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


def _build_wheel(folder: Path, dist_name: str = "metaopt-count-steps", modules=None, entries=None) -> Path:
    """A minimal PEP 427 wheel declaring ``metaopt.plugins`` entry points."""
    stem = dist_name.replace("-", "_")
    dist = f"{stem}-0.1.dist-info"
    modules = modules if modules is not None else {"metaopt_count_steps": PLUGIN_SOURCE}
    entries = entries if entries is not None else ["count_steps = metaopt_count_steps:CountSteps"]
    files = {f"{module}.py": text for module, text in modules.items()}
    files.update(
        {
            f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {dist_name}\nVersion: 0.1\n",
            f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
            f"{dist}/entry_points.txt": "[metaopt.plugins]\n" + "\n".join(entries) + "\n",
        }
    )
    record = []
    for name, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(text.encode())}")
    record.append(f"{dist}/RECORD,,")
    files[f"{dist}/RECORD"] = "\n".join(record) + "\n"
    wheel = folder / f"{stem}-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for name, text in files.items():
            zf.writestr(name, text)
    return wheel


def _install(wheel: Path, target: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", str(target), str(wheel)]
    subprocess.run(cmd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("third_party")
    target = root / "site"
    _install(_build_wheel(root), target)
    return target


def _metaopt(site: Path, *args: str, disable: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    env.pop("METAOPT_DISABLE_ENTRY_POINTS", None)
    if disable:
        env["METAOPT_DISABLE_ENTRY_POINTS"] = "1"
    cmd = [sys.executable, "-m", "metaopt.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=OUTSIDE)


@pytest.mark.slow
def test_installed_plugin_is_listed_and_can_be_disabled(site):
    listed = json.loads(_metaopt(site, "plugins", "--json").stdout)
    assert listed["count_steps"].startswith("Counts inner steps")
    hidden = json.loads(_metaopt(site, "plugins", "--json", disable=True).stdout)
    assert "count_steps" not in hidden and "shot" in hidden


@pytest.mark.slow
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


SHADOW_SOURCE = '''
class Anil:
    """A third-party plugin that happens to be called anil."""
'''


@pytest.fixture(scope="module")
def crowded_site(tmp_path_factory) -> Path:
    """count_steps, a third-party 'anil' (clashing with the built-in) and an entry point that cannot import."""
    root = tmp_path_factory.mktemp("crowded")
    target = root / "site"
    _install(_build_wheel(root), target)
    modules = {"other_anil": SHADOW_SOURCE, "broken_plugin": "raise ImportError('needs a missing library')\n"}
    entries = ["anil = other_anil:Anil", "broken = broken_plugin:Broken"]
    _install(_build_wheel(root, "other-plugins", modules, entries), target)
    return target


@pytest.mark.slow
def test_a_third_party_anil_never_silently_shadows_or_is_shadowed(crowded_site, tmp_path):
    """The built-in anil silently replaced an installed plugin registered as anil."""
    listed = json.loads(_metaopt(crowded_site, "plugins", "--json").stdout)
    assert "builtin/anil" in listed and "other-plugins/anil" in listed and "anil" not in listed
    train = ["train", "--data", "sinusoid", "--meta-batch", "2", "--iterations", "1", "--no-progress"]
    clash = _metaopt(crowded_site, *train, "--plugin", "anil", "--out", str(tmp_path / "a"))
    assert clash.returncode == 2
    assert "'builtin' and by 'other-plugins'" in clash.stderr and "'builtin/anil', 'other-plugins/anil'" in clash.stderr
    chosen = _metaopt(crowded_site, *train, "--plugin", "builtin/anil", "--out", str(tmp_path / "b"))
    assert chosen.returncode == 0, chosen.stderr
    assert json.loads((tmp_path / "b" / "config.json").read_text())["plugins"] == ["builtin/anil"]
    code = "import metaopt; print(type(metaopt.create_plugin('other-plugins/anil')).__module__)"
    env = {**os.environ, "PYTHONPATH": str(crowded_site)}
    env.pop("METAOPT_DISABLE_ENTRY_POINTS", None)
    picked = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=OUTSIDE)
    assert picked.stdout.strip() == "other_anil", picked.stderr


@pytest.mark.slow
def test_a_broken_entry_point_breaks_only_its_own_name(crowded_site, tmp_path):
    shown = _metaopt(crowded_site, "plugins")
    assert shown.returncode == 0, shown.stderr
    assert "BROKEN" in shown.stdout and "needs a missing library" in shown.stdout and "shot" in shown.stdout
    train = ["train", "--data", "sinusoid", "--meta-batch", "2", "--iterations", "1", "--no-progress"]
    fine = _metaopt(crowded_site, *train, "--plugin", "shot", "--out", str(tmp_path / "a"))
    assert fine.returncode == 0, fine.stderr
    broken = _metaopt(crowded_site, *train, "--plugin", "broken", "--out", str(tmp_path / "b"))
    assert broken.returncode == 2 and "'other-plugins'" in broken.stderr and "needs a missing library" in broken.stderr
