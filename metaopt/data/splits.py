"""Hold classes out: split one labelled dataset into meta-train and meta-test classes.

Few-shot evaluation is on classes never seen in meta-training; validating on the training
classes measures memorisation, not adaptation.  :func:`split_classes` splits by class (never by
item), and :func:`shared_classes` says when two episode datasets draw from the same classes.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from torch.utils.data import Dataset, Subset

from metaopt.data.dataset import ClassKey, class_key, class_labels
from metaopt.errors import DataError


class ClassSubset(Dataset):
    """The items of ``dataset`` whose class is in a given set; ``targets`` holds their labels, so an
    :class:`~metaopt.data.EpisodeDataset` over it reads no item to find the classes."""

    def __init__(self, dataset: Any, indices: list[int], targets: list[ClassKey]) -> None:
        self.dataset, self.indices, self.targets = dataset, indices, targets
        self.classes_held = sorted(set(targets))

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        return self.dataset[self.indices[i]]


def split_classes(
    dataset: Any,
    test_classes: float | Sequence[ClassKey] = 0.2,
    *,
    labels: Sequence[ClassKey] | str | None = None,
    seed: int = 0,
) -> tuple[ClassSubset, ClassSubset]:
    """``(meta_train, meta_test)``: the dataset split by class, no class in both.

    Args:
        dataset: any map-style dataset an :class:`~metaopt.data.EpisodeDataset` accepts.
        test_classes: the fraction of classes to hold out (drawn with ``seed``), or the held-out
            class labels themselves.
        labels: one class per item (or a Hugging Face column name); default: found as
            ``EpisodeDataset`` finds them.
    """
    found = class_labels(dataset, labels)
    classes = sorted(set(found))
    if isinstance(test_classes, float | int) and not isinstance(test_classes, bool):
        if not 0 < test_classes < 1:
            raise DataError(f"test_classes={test_classes!r}: give a fraction in (0, 1) or a list of class labels.")
        count = int(round(test_classes * len(classes)))
        if not 1 <= count < len(classes):
            raise DataError(
                f"test_classes={test_classes} of {len(classes)} classes holds out {count}; both sides need at "
                "least one class. Use another fraction or list the held-out classes."
            )
        held = set(np.random.default_rng(seed).permutation(classes)[:count].tolist())
    else:
        if isinstance(test_classes, str):
            raise DataError(
                f"test_classes={test_classes!r} is one string; give a list of class labels: [{test_classes!r}]."
            )
        held = {class_key(c, "a held-out class") for c in test_classes}
        unknown = sorted(held - set(classes))
        if unknown:
            raise DataError(f"held-out classes {unknown} do not occur in the dataset; its classes are {classes[:20]}.")
        if not held or held == set(classes):
            raise DataError(f"test_classes={sorted(held)} leaves no class on one side; hold out some, not all.")
    train = [i for i, label in enumerate(found) if label not in held]
    test = [i for i, label in enumerate(found) if label in held]
    return (
        ClassSubset(dataset, train, [found[i] for i in train]),
        ClassSubset(dataset, test, [found[i] for i in test]),
    )


def _origin(dataset: Any) -> tuple[Any, set[int]]:
    """The underlying dataset and the classes an episode dataset's items come from."""
    inner = getattr(dataset, "dataset", dataset)  # EpisodeDataset -> what it wraps
    classes = set(getattr(dataset, "classes", []) if isinstance(getattr(dataset, "classes", None), list) else [])
    while isinstance(inner, ClassSubset | Subset):  # a split by class, or the user's own split by item
        inner = inner.dataset
    return inner, classes


def shared_classes(train: Any, test: Any) -> list[int]:
    """Classes that two :class:`~metaopt.data.EpisodeDataset`\\ s over the same data both draw from."""
    train_base, train_classes = _origin(train)
    test_base, test_classes = _origin(test)
    if train_base is not test_base:
        return []
    return sorted(train_classes & test_classes)


def warn_if_not_held_out(train: Any, test: Any, where: str) -> None:
    """A ``UserWarning`` when the evaluation tasks come from the training classes."""
    shared = shared_classes(train, test)
    if shared:
        warnings.warn(
            f"{where}: the evaluation tasks are drawn from {len(shared)} classes that meta-training also uses "
            f"({shared[:10]}); that measures memorisation, not few-shot adaptation. Hold classes out with "
            "metaopt.data.split_classes(dataset) and build each EpisodeDataset on its own side.",
            HeldOutWarning,
            stacklevel=3,
        )


class HeldOutWarning(UserWarning):
    """Evaluation on the classes meta-training uses."""
