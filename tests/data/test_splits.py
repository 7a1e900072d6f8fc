"""Holding classes out: split_classes and the warning when evaluation reuses training classes."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.utils.data import Subset, TensorDataset

from metaopt.data import EpisodeDataset, split_classes
from metaopt.data.splits import HeldOutWarning, shared_classes, warn_if_not_held_out
from metaopt.errors import DataError


def _dataset(classes: int = 10, per_class: int = 4):
    labels = torch.arange(classes).repeat_interleave(per_class)
    features = labels.double().unsqueeze(1) + 0.01 * torch.arange(len(labels)).double().unsqueeze(1)
    return TensorDataset(features, labels), labels.tolist()


def test_split_classes_holds_whole_classes_out():
    dataset, labels = _dataset()
    train, test = split_classes(dataset, 0.3, labels=labels, seed=1)
    assert len(set(train.targets)) == 7 and len(set(test.targets)) == 3
    assert not set(train.targets) & set(test.targets)
    assert len(train) + len(test) == len(dataset)
    for subset in (train, test):  # items are the dataset's own, with their labels
        for i in range(len(subset)):
            x, y = subset[i]
            assert int(y) == subset.targets[i] and torch.equal(x, dataset[subset.indices[i]][0])
    again, _ = split_classes(dataset, 0.3, labels=labels, seed=1)
    assert again.indices == train.indices  # a function of the seed
    train_tasks, test_tasks = (
        EpisodeDataset(train, ways=3, shots=1, query=1),
        EpisodeDataset(test, ways=3, shots=1, query=1),
    )
    seen_train = {int(v) for i in range(20) for v in train_tasks[i].support_x.floor().flatten()}
    seen_test = {int(v) for i in range(20) for v in test_tasks[i].support_x.floor().flatten()}
    assert seen_train <= set(train.targets) and seen_test <= set(test.targets)
    assert shared_classes(train_tasks, test_tasks) == []


def test_split_classes_takes_explicit_classes_and_names_bad_values():
    dataset, labels = _dataset()
    train, test = split_classes(dataset, [0, 9], labels=labels)
    assert set(test.targets) == {0, 9} and 0 not in train.targets
    with pytest.raises(DataError, match=r"held-out classes \[42\] do not occur"):
        split_classes(dataset, [42], labels=labels)
    with pytest.raises(DataError, match="test_classes=1.5"):
        split_classes(dataset, 1.5, labels=labels)
    with pytest.raises(DataError, match="both sides need at least one class"):
        split_classes(dataset, 0.01, labels=labels)


def test_split_classes_holds_named_classes_out():
    names = [f"species_{c}" for c in range(6) for _ in range(3)]
    dataset = TensorDataset(torch.arange(len(names)).unsqueeze(1), torch.zeros(len(names)))
    train, test = split_classes(dataset, ["species_2", "species_5"], labels=names)
    assert set(test.targets) == {"species_2", "species_5"} and len(set(train.targets)) == 4
    assert all(names[i] in {"species_2", "species_5"} for i in test.indices)
    drawn, _ = split_classes(dataset, 0.5, labels=names, seed=0)
    assert len(set(drawn.targets)) == 3 and all(isinstance(t, str) for t in drawn.targets)
    tasks = EpisodeDataset(test, ways=2, shots=1, query=1)  # names reach the episodes through targets
    assert tasks.classes == ["species_2", "species_5"]
    with pytest.raises(DataError, match=r"test_classes='species_2' is one string; give a list"):
        split_classes(dataset, "species_2", labels=names)
    with pytest.raises(DataError, match=r"held-out classes \['species_9'\] do not occur"):
        split_classes(dataset, ["species_9"], labels=names)


def test_evaluating_on_the_training_classes_warns():
    """The first hand loop written from the docs validated on its own training classes, silently."""
    dataset, labels = _dataset()
    same = EpisodeDataset(dataset, ways=3, shots=1, query=1, labels=labels)
    by_item = EpisodeDataset(Subset(dataset, list(range(0, 40, 2))), ways=3, shots=1, query=1)
    with pytest.warns(HeldOutWarning, match="10 classes that meta-training also uses"):
        warn_if_not_held_out(same, by_item, "test")
    train, test = split_classes(dataset, 0.3, labels=labels)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_not_held_out(
            EpisodeDataset(train, ways=3, shots=1, query=1), EpisodeDataset(test, ways=3, shots=1, query=1), "test"
        )
