"""What a run's file-based data held when it was trained, so that a changed folder is noticed.

The splits of ``folder:`` and ``omniglot:`` data are functions of a listing (every fifth class
sorted by name; the last fifth of the alphabets): one class added to the folder shifts which
classes are held out, and `metaopt eval` would then score classes that meta-training used, as
"test", without a word.  A run therefore records each split's classes, with the count and a digest
of the file names of each (``RUN/data.json``), and a resume or an evaluation on the run's own data
compares the data it finds with that record.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

from metaopt.errors import DataError

#: per split: {class name: [number of images, digest of their file names]}
SplitRecord = dict[str, list[Any]]


def split_record(sampler: Any) -> SplitRecord | None:
    """The classes of a ``folder:``, ``csv:`` or ``omniglot:`` sampler's split; None for other sources."""
    from metaopt.data.files import ImageFiles, OmniglotImages

    dataset = getattr(getattr(sampler, "episodes", None), "dataset", None)
    if isinstance(dataset, ImageFiles):
        pairs = [(Path(path).name, label) for path, label in dataset.files]
    elif isinstance(dataset, OmniglotImages):
        pairs = [(str(where).replace("\\", "/").rsplit("/", 1)[-1], label) for where, _, label in dataset.items]
    else:
        return None
    names: dict[int, list[str]] = {}
    for name, label in pairs:
        names.setdefault(label, []).append(name)
    return {
        dataset.classes[label]: [
            len(files),
            hashlib.blake2b("\n".join(sorted(files)).encode(), digest_size=6).hexdigest(),
        ]
        for label, files in sorted(names.items())
    }


def data_record(spec: str, splits: dict[str, SplitRecord | None]) -> dict[str, Any] | None:
    """The run's data record (``RUN/data.json``), or None when no split comes from files."""
    if all(record is None for record in splits.values()):
        return None
    return {"data": spec, "splits": splits}


def read_record(path: Path) -> dict[str, Any] | None:
    """A saved record, or None for a run trained before records were kept (nothing to compare)."""
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(
            f"cannot read the run's data record {str(path)!r}: {exc}. Delete it to skip the check."
        ) from exc
    return record if isinstance(record, dict) and isinstance(record.get("splits"), dict) else None


def check_unchanged(saved: dict[str, Any] | None, split: str, current: SplitRecord | None, what: str) -> None:
    """Refuse data whose ``split`` differs from what the run recorded, naming the classes that differ."""
    if saved is None or current is None or saved["splits"].get(split) is None:
        return
    before: SplitRecord = saved["splits"][split]
    added = sorted(set(current) - set(before))
    removed = sorted(set(before) - set(current))
    changed = sorted(c for c in set(before) & set(current) if list(before[c]) != list(current[c]))
    if not (added or removed or changed):
        return
    parts = [f"{_classes(len(c))} {label} ({_names(c)})" for label, c in (("added", added), ("gone", removed)) if c]
    if changed:
        first = changed[0]
        parts.append(
            f"{_classes(len(changed))} with other images (e.g. {first!r}: {before[first][0]} images then, "
            f"{current[first][0]} now)"
        )
    other = {"test": "train", "train": "test"}.get(split)
    leaked = sorted(set(current) & set(saved["splits"].get(other) or {})) if other else []
    if leaked:
        held = "meta-training classes" if split == "test" else "the run's held-out classes"
        parts.append(f"the {split} split now holds {held} ({_names(leaked)})")
    raise DataError(
        f"the {split} split of {saved['data']} is not what this run was trained with: {'; '.join(parts)}. "
        f"The splits are chosen from the data's listing, so {what} would draw other tasks than the run's, and "
        "held-out classes may be training classes. Restore the data as it was; to use it as it is now, start a "
        "new run (or pass metaopt eval --data to score other data knowingly)."
    )


def _classes(count: int) -> str:
    return f"{count} class" if count == 1 else f"{count} classes"


def _names(classes: list[str]) -> str:
    return ", ".join(map(repr, classes[:5])) + (", ..." if len(classes) > 5 else "")


def warn_if_trained_on(saved: dict[str, Any] | None, current: SplitRecord | None, chosen: str) -> None:
    """A ``HeldOutWarning`` when test classes chosen by hand (``chosen``) include classes the run meta-trained on."""
    from metaopt.data.splits import HeldOutWarning

    if saved is None or current is None or not saved["splits"].get("train"):
        return
    shared = sorted(set(current) & set(saved["splits"]["train"]))
    if shared:
        warnings.warn(
            f"{chosen} evaluates on {_classes(len(shared))} this run meta-trained on ({_names(shared)}); that "
            "measures memorisation, not few-shot adaptation. Choose held-out classes (the run's own test split "
            "is the default; for csv: data, test.csv must not list classes of the training file).",
            HeldOutWarning,
            stacklevel=2,
        )
