"""The Omniglot one-shot classification run format (Lake et al., 2015), written and read.

A folder of runs ``runNN/``, each holding ``training/classXX.png`` (one image per class),
``test/itemXX.png`` and ``class_labels.txt`` (lines ``runNN/test/itemXX.png runNN/training/classYY.png``).
One run is a 20-way 1-shot task within one alphabet, the training image drawn by one person
and the test images by another; the score is the error rate over all test items of all runs.
"""

from __future__ import annotations

import json
import re
import zipfile
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from metaopt.data.images import image_to_tensor
from metaopt.errors import ConfigError, DataError
from metaopt.task import TaskData

_DRAWER = re.compile(r"_(\d+)\.png$")


def _characters(archive: Path, alphabet: str) -> dict[str, dict[str, str]]:
    """character -> drawer -> member name inside the zip."""
    chars: dict[str, dict[str, str]] = defaultdict(dict)
    with zipfile.ZipFile(archive) as zf:
        for name in zf.namelist():
            parts = name.split("/")
            match = _DRAWER.search(name)
            if len(parts) >= 3 and parts[-3] == alphabet and match:
                chars[parts[-2]][match.group(1)] = name
    return dict(chars)


def write_lake_runs(
    archive: str | Path, alphabets: list[str], out: str | Path, runs: int = 20, ways: int = 20, seed: int = 0
) -> dict:
    """Write ``runs`` runs in the official format from ``alphabets`` of an Omniglot zip.

    Runs cycle through the alphabets that have at least ``ways`` characters (the others are
    listed as skipped in the returned manifest, also written to ``out/runs.json``).  The
    original 105x105 PNG bytes are copied unchanged.
    """
    archive, out = Path(archive), Path(out)
    if not archive.is_file():
        raise DataError(f"Omniglot archive {str(archive)!r} does not exist.")
    if not zipfile.is_zipfile(archive):
        raise DataError(f"{str(archive)!r} is not a zip archive; give an official images_background*.zip.")
    if ways < 2:
        raise DataError(f"ways={ways}: a one-shot run needs at least 2 classes (the official runs have 20).")
    if runs < 1:
        raise DataError(f"runs={runs} must be >= 1.")
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {str(out)!r} is a file; give a folder for the runs.")
    g = torch.Generator().manual_seed(seed)
    usable, skipped = {}, {}
    for alphabet in alphabets:
        chars = _characters(archive, alphabet)
        if not chars:
            raise DataError(f"alphabet {alphabet!r} is not in {archive.name}.")
        if len(chars) >= ways:
            usable[alphabet] = chars
        else:
            skipped[alphabet] = f"{len(chars)} characters < {ways} ways"
    if not usable:
        raise DataError(f"none of {alphabets} has {ways} characters for a {ways}-way run ({skipped}).")
    manifest: dict = {"archive": archive.name, "ways": ways, "seed": seed, "skipped": skipped, "runs": []}
    names = sorted(usable)
    with zipfile.ZipFile(archive) as zf:
        for r in range(runs):
            alphabet = names[r % len(names)]
            chars = usable[alphabet]
            picked = [sorted(chars)[i] for i in torch.randperm(len(chars), generator=g)[:ways].tolist()]
            drawers = sorted(set.intersection(*(set(chars[c]) for c in picked)))
            first, second = (drawers[i] for i in torch.randperm(len(drawers), generator=g)[:2].tolist())
            run = out / f"run{r + 1:02d}"
            (run / "training").mkdir(parents=True, exist_ok=True)
            (run / "test").mkdir(parents=True, exist_ok=True)
            order = torch.randperm(ways, generator=g).tolist()  # test items in shuffled order
            lines = []
            for k, char in enumerate(picked):
                (run / "training" / f"class{k + 1:02d}.png").write_bytes(zf.read(chars[char][first]))
            for item, k in enumerate(order):
                (run / "test" / f"item{item + 1:02d}.png").write_bytes(zf.read(chars[picked[k]][second]))
                lines.append(f"{run.name}/test/item{item + 1:02d}.png {run.name}/training/class{k + 1:02d}.png")
            (run / "class_labels.txt").write_text("\n".join(lines) + "\n")
            manifest["runs"].append({"run": run.name, "alphabet": alphabet, "drawers": [first, second]})
    (out / "runs.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def read_lake_runs(path: str | Path, size: int = 28) -> list[TaskData]:
    """Each run as a task: support = the training images (label = class index), query = test items."""
    root = Path(path)
    runs = (
        sorted(p for p in root.iterdir() if p.is_dir() and (p / "class_labels.txt").is_file()) if root.is_dir() else []
    )
    if not runs:
        raise DataError(f"{str(root)!r} holds no runs (folders with class_labels.txt, training/ and test/).")
    tasks = []
    for run in runs:
        classes = sorted((run / "training").glob("class*.png"))
        index = {p.name: i for i, p in enumerate(classes)}
        items, labels = [], []
        labels_file = run / "class_labels.txt"
        try:
            text = labels_file.read_bytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"{str(labels_file)!r} is not UTF-8 text ({exc.reason} at byte {exc.start}).") from exc
        if not text.strip():
            raise DataError(f"{str(labels_file)!r} is empty; each line pairs a test item with its training class.")
        for n, line in enumerate(text.split("\n")):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2:
                raise DataError(
                    f"{run / 'class_labels.txt'} line {n + 1}: expected 'test/itemXX.png training/classYY.png'."
                )
            item, label = (Path(p).name for p in parts)
            if label not in index:
                raise DataError(f"{run / 'class_labels.txt'} line {n + 1}: {label!r} is not in {run / 'training'}.")
            items.append(image_to_tensor(run / "test" / item, size, 1, True, str(run / "test" / item)))
            labels.append(index[label])
        support = torch.stack([image_to_tensor(p, size, 1, True, str(p)) for p in classes])
        tasks.append(TaskData(support, torch.arange(len(classes)), torch.stack(items), torch.tensor(labels)))
    return tasks


def read_lake_runs_per_member(path: str | Path, sizes: Sequence[int]) -> list[list[TaskData]]:
    """The runs at each ensemble member's image size (``sizes``, one per member), each size read once."""
    by_size = {size: read_lake_runs(path, size=size) for size in dict.fromkeys(sizes)}
    return [by_size[size] for size in sizes]


def lake_errors(learner: Any, tasks: list[TaskData], steps: int | None = None) -> tuple[int, int, list[float]]:
    """Score one-shot runs: (wrong items, items, per-run error rate) after ``steps`` test steps."""
    wrong = total = 0
    per_run = []
    for task in tasks:
        accuracy = learner.evaluate([task], steps=steps).metrics["accuracy"]
        n = len(task.query_y)
        errors = round((1 - accuracy) * n)
        wrong, total = wrong + errors, total + n
        per_run.append(errors / n)
    return wrong, total, per_run


def lake_ensemble_errors(
    learners: Sequence[Any], tasks: list[TaskData] | Sequence[list[TaskData]], steps: int | None = None
) -> tuple[int, int, list[float]]:
    """Score one-shot runs with an ensemble: each item goes to the class of highest mean softmax
    probability over the members, each adapted to the run on its own (``steps`` test steps, default
    each member's own).  ``tasks`` is one list for all members, or one list per member (members
    trained at different image sizes read the runs at their own size).
    """
    if not learners:
        raise ConfigError("an ensemble needs at least one learner.")
    per_member = [tasks] * len(learners) if not tasks or isinstance(tasks[0], TaskData) else list(tasks)
    if len(per_member) != len(learners) or len({len(t) for t in per_member}) != 1:
        raise ConfigError(
            f"got {len(learners)} learners but task lists of lengths {[len(t) for t in per_member]}; give one "
            "list for all members or one list of the same runs per member."
        )
    wrong = total = 0
    per_run = []
    for runs in zip(*per_member, strict=True):
        probs = sum(learner.predict(run, steps=steps).float().softmax(dim=1) for learner, run in zip(learners, runs))
        labels = runs[0].query_y.to(probs.device)
        errors = int((probs.argmax(dim=1) != labels).sum())
        wrong, total = wrong + errors, total + len(labels)
        per_run.append(errors / len(labels))
    return wrong, total, per_run
