"""Episodes from the data users already have: any map-style ``Dataset`` becomes a dataset of tasks.

``EpisodeDataset(dataset, ways, shots, query)`` is itself a map-style dataset whose item ``i``
is task ``i``: a pure function of ``(seed, i)``, so a ``DataLoader`` with any number of workers
yields the same tasks, and resuming at task ``i`` is exact.  Items are loaded lazily (only the
images a task needs) and keep the dtype and values the user's dataset and transform give them
(:func:`item_tensor`): a normalised float stays normalised, a feature vector stays as it is.
Only decoded PIL images are held compactly, as ``uint8`` (lossless), until :func:`collate_tasks`
turns ``uint8`` into float32 in [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from metaopt.data.sampler import TaskSampler
from metaopt.errors import DataError
from metaopt.task import TaskData

Transform = Callable[[Any], Any]


def _column_names(dataset: Any) -> list[str] | None:
    names = getattr(dataset, "column_names", None)
    return list(names) if isinstance(names, list | tuple) else None


#: a class label: an integer, or a name (a folder, a CSV's label column, a Hugging Face string column)
ClassKey = int | str


def class_key(value: Any, where: str) -> ClassKey:
    """A label as a class: an integer (integral floats, numpy and one-element tensors included) or a
    string; a fractional or non-finite number, which ``int()`` would truncate into a wrong class, is refused."""
    if (
        isinstance(value, torch.Tensor)
        and value.numel() == 1
        or isinstance(value, np.ndarray | np.generic)
        and value.size == 1
    ):
        value = value.item()
    if isinstance(value, str):
        return value
    if isinstance(value, bool | int):
        return int(value)
    if isinstance(value, float) and math.isfinite(value) and value == int(value):
        return int(value)
    kind = "a fractional or non-finite number" if isinstance(value, float) else f"a {type(value).__name__}"
    raise DataError(
        f"{where} is {value!r}, {kind}, not a class. Episodes need class labels (integers or names); "
        "for regression targets build tasks yourself (support_x, support_y, query_x, query_y), or pass labels=."
    )


def class_labels(dataset: Any, labels: Sequence[ClassKey] | str | None = None, progress: bool = True) -> list[ClassKey]:
    """Each item's class: ``labels`` (a sequence, or a Hugging Face column name), else
    ``dataset.targets`` / ``dataset.labels`` / a ``label`` column, else one pass over the dataset."""
    columns = _column_names(dataset)
    if isinstance(labels, str):
        if columns is None or labels not in columns:
            raise DataError(f"label column {labels!r} does not exist; the dataset's columns are {columns}.")
        return _keys(list(dataset[labels]), f"label column {labels!r}")
    if labels is not None:
        found = list(labels)
    elif isinstance(getattr(dataset, "targets", None), Sequence | torch.Tensor | np.ndarray):
        found = list(dataset.targets)
    elif isinstance(getattr(dataset, "labels", None), Sequence | torch.Tensor | np.ndarray):
        found = list(dataset.labels)
    elif columns is not None and "label" in columns:
        found = list(dataset["label"])
    else:  # one pass over the items: say so (it reads every item once)
        items = tqdm(range(len(dataset)), desc="reading labels (pass labels= to skip)", disable=not progress)
        found = [_split_item(dataset[i], None)[1] for i in items]
    if len(found) != len(dataset):
        raise DataError(f"{len(found)} labels for a dataset of {len(dataset)} items; give one label per item.")
    return _keys(found, "label")


def _keys(found: list[Any], what: str) -> list[ClassKey]:
    keys = [class_key(v, f"{what} of item {i}") for i, v in enumerate(found)]
    if len({type(k) for k in keys}) > 1:
        first_str = next(i for i, k in enumerate(keys) if isinstance(k, str))
        first_int = next(i for i, k in enumerate(keys) if isinstance(k, int))
        raise DataError(
            f"labels mix names and numbers (item {first_int}: {keys[first_int]!r}, item {first_str}: "
            f"{keys[first_str]!r}); give every item the same kind of label."
        )
    return keys


def _split_item(item: Any, image_key: str | None) -> tuple[Any, Any]:
    """(image, label) of a dataset item: a (x, y) pair or a dict with an image column."""
    if isinstance(item, dict):
        key = image_key or next((k for k in ("image", "img", "pixel_values") if k in item), None)
        if key is None:
            raise DataError(f"dataset items are dicts without an image column; have {sorted(item)}. Pass image_key=.")
        return item[key], item.get("label")
    if isinstance(item, tuple | list) and len(item) >= 2:
        return item[0], item[1]
    raise DataError(f"a dataset item must be (image, label) or a dict with an image; got {type(item).__name__}.")


#: PIL modes with 8 bits per channel: decoded to ``uint8`` without loss
EIGHT_BIT_MODES = ("1", "L", "P", "RGB", "RGBA", "CMYK", "YCbCr", "LA", "PA", "RGBX", "LAB", "HSV")


def item_tensor(image: Any, where: str) -> torch.Tensor:
    """What a dataset item (after the transform) holds, as a tensor that loses nothing.

    A tensor is kept as it is (dtype, values, shape); a numpy array (or a number, a list) becomes
    the tensor of the same dtype and values.  A decoded PIL image becomes ``uint8`` [C, H, W]
    (grey, or RGB for colour modes; 8 bits per channel, so nothing is lost), and a 16-bit or float
    PIL image ("I", "I;16", "F") a float32 tensor [1, H, W] of the same values.  Only ``uint8``
    items are changed later, by :func:`collate_tasks`: to float32 in [0, 1], as ``ToTensor`` would.
    """
    try:
        if hasattr(image, "convert") and hasattr(image, "mode"):  # PIL
            if image.mode in EIGHT_BIT_MODES:
                array = np.asarray(image.convert("L") if image.mode in ("1", "L") else image.convert("RGB"))
            else:
                array = np.asarray(image, dtype=np.float32)
            tensor = torch.from_numpy(array.copy())
            return tensor.unsqueeze(0) if tensor.dim() == 2 else tensor.permute(2, 0, 1)
        if isinstance(image, np.ndarray):
            return torch.from_numpy(np.ascontiguousarray(image))
        return torch.as_tensor(image)
    except (OSError, ValueError, TypeError) as exc:
        raise DataError(f"cannot read image {where}: {exc}. Remove or replace that item.") from exc


def _stack(items: list[torch.Tensor], indices: list[int]) -> torch.Tensor:
    """The items of a task stacked; items that differ in dtype or shape are named."""
    first = items[0]
    for item, index in zip(items[1:], indices[1:], strict=True):
        if item.dtype != first.dtype or item.shape != first.shape:
            raise DataError(
                f"dataset items {indices[0]} and {index} differ after the transform: {tuple(first.shape)} "
                f"{first.dtype} vs {tuple(item.shape)} {item.dtype}. Give every item one shape and dtype "
                "(e.g. a Resize and ToDtype in the transform)."
            )
    return torch.stack(items)


class EpisodeDataset(Dataset):
    """N-way K-shot tasks over any map-style dataset; item ``i`` is task ``i`` (deterministic).

    Args:
        dataset: a map-style dataset of ``(image, label)`` pairs (a torchvision ``ImageFolder``,
            your own) or of dicts (a Hugging Face ``datasets.Dataset``).
        labels: one class per item (integers or names), or a Hugging Face column name; default:
            found (see :func:`class_labels`).
        transform: applied to each image on its own (support and query independently), e.g.
            ``torchvision.transforms.v2``; it gets what the dataset holds (PIL or tensor) and
            may return PIL, numpy or a tensor.
        rotations: Omniglot-style task augmentation: each class of a task is rotated by a random
            multiple of 90 degrees (the rotated copies act as new classes).
        length: tasks per pass (``len``); default 10,000.
        groups: a group name per class (e.g. the Omniglot alphabet), to draw every task's classes
            from one group, as the Lake one-shot runs do (``within_group=True``).
    """

    def __init__(
        self,
        dataset: Any,
        ways: int = 5,
        shots: int = 1,
        query: int = 15,
        labels: Sequence[ClassKey] | str | None = None,
        transform: Transform | None = None,
        seed: int = 0,
        rotations: bool = False,
        length: int = 10_000,
        image_key: str | None = None,
        groups: dict[ClassKey, str] | None = None,
        within_group: bool = False,
    ) -> None:
        if min(ways, shots, query, length) < 1:
            raise DataError(f"ways={ways}, shots={shots}, query={query} and length={length} must all be >= 1.")
        self.dataset, self.transform, self.image_key = dataset, transform, image_key
        self.ways, self.shots, self.query, self.seed = ways, shots, query, seed
        self.rotations, self.length = rotations, length
        by_class: dict[ClassKey, list[int]] = {}
        for index, label in enumerate(class_labels(dataset, labels)):
            by_class.setdefault(label, []).append(index)
        small = {c: len(v) for c, v in by_class.items() if len(v) < shots + query}
        if small:
            name = self._class_name(next(iter(small)))
            raise DataError(
                f"class {name!r} has {small[next(iter(small))]} items but a task needs shots + query = "
                f"{shots + query} per class ({len(small)} classes are that small). Lower shots/query or drop them."
            )
        self.classes = sorted(by_class)
        self.members = [by_class[c] for c in self.classes]
        available = len(self.classes) * (4 if rotations else 1)
        if ways > available:
            raise DataError(f"ways={ways} is larger than the {available} classes available; lower ways or add classes.")
        self.group_members: list[list[int]] | None = None
        if within_group:
            if groups is None:
                raise DataError("within_group=True needs groups (a group name per class label).")
            by_group: dict[str, list[int]] = {}
            for position, label in enumerate(self.classes):
                by_group.setdefault(groups[label], []).append(position)
            factor = 4 if rotations else 1
            self.group_members = [m for m in by_group.values() if len(m) * factor >= ways]
            if not self.group_members:
                largest = max(len(m) for m in by_group.values()) * factor
                raise DataError(f"no group has {ways} classes for within-group tasks (the largest has {largest}).")

    def _class_name(self, label: ClassKey) -> str:
        if isinstance(label, str):
            return label
        names = getattr(self.dataset, "classes", None)
        return str(names[label]) if isinstance(names, Sequence) and 0 <= label < len(names) else str(label)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> TaskData:
        # random transforms draw from torch's generator: seed it from (seed, index) too, inside
        # fork_rng so the caller's generator is left as it was (workers or not, same tasks)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(np.random.SeedSequence([self.seed, int(index)]).generate_state(1)[0]))
            return self._task(index)

    def _task(self, index: int) -> TaskData:
        rng = np.random.default_rng([self.seed, int(index)])
        n = len(self.classes) * (4 if self.rotations else 1)
        if self.group_members is None:
            picked = rng.choice(n, size=self.ways, replace=False)
        else:  # one group, then classes (and rotations) inside it
            members = self.group_members[int(rng.integers(len(self.group_members)))]
            pool = [m + r * len(self.classes) for r in range(4 if self.rotations else 1) for m in members]
            picked = np.asarray(pool)[rng.choice(len(pool), size=self.ways, replace=False)]
        support, query, support_items, query_items = [], [], [], []
        for virtual in picked:
            members = self.members[int(virtual) % len(self.classes)]
            items = rng.choice(len(members), size=self.shots + self.query, replace=False)
            chosen = [members[int(i)] for i in items]
            images = [self._load(i) for i in chosen]
            if self.rotations:
                if images[0].dim() < 2:
                    raise DataError(
                        f"rotations=True turns images by 90 degrees, but dataset item {chosen[0]} has shape "
                        f"{tuple(images[0].shape)}; use rotations only with images ([C, H, W] or [H, W])."
                    )
                quarter_turns = int(virtual) // len(self.classes)
                odd = next(((i, x) for i, x in zip(chosen, images, strict=True) if x.shape[-1] != x.shape[-2]), None)
                if odd is not None:  # a quarter turn swaps height and width (refused for every task, not by chance)
                    raise DataError(
                        f"rotations=True turns images by 90 degrees, which needs square images; dataset item "
                        f"{odd[0]} is {tuple(odd[1].shape[-2:])} (height, width). Resize to a square in the "
                        "transform (e.g. v2.Resize((28, 28)))."
                    )
                images = [torch.rot90(x, quarter_turns, dims=(-2, -1)) for x in images]
            support.extend(images[: self.shots])
            query.extend(images[self.shots :])
            support_items.extend(chosen[: self.shots])
            query_items.extend(chosen[self.shots :])
        labels = torch.arange(self.ways)
        stacked = _stack(support + query, support_items + query_items)
        n = self.ways * self.shots
        return TaskData(
            stacked[:n],
            labels.repeat_interleave(self.shots),
            stacked[n:],
            labels.repeat_interleave(self.query),
        )

    def _load(self, index: int) -> torch.Tensor:
        try:
            item = self.dataset[index]
        except (OSError, ValueError) as exc:  # e.g. PIL cannot decode a file of an ImageFolder
            samples = getattr(self.dataset, "samples", None)
            where = f"{samples[index][0]!r}" if isinstance(samples, Sequence) else f"item {index}"
            raise DataError(f"cannot read {where}: {type(exc).__name__}: {exc}. Remove or replace it.") from exc
        image, _ = _split_item(item, self.image_key)
        if self.transform is not None:
            image = self.transform(image)
        return item_tensor(image, f"item {index}")


def as_model_input(x: torch.Tensor) -> torch.Tensor:
    """``uint8`` (decoded images) as float32 in [0, 1]; every other dtype unchanged."""
    return x.float().div_(255) if x.dtype == torch.uint8 else x


def collate_tasks(tasks: list[TaskData]) -> list[TaskData]:
    """A ``DataLoader`` ``collate_fn``: a meta-batch (list of tasks), ``uint8`` inputs as float32 in [0, 1].

    Inputs of any other dtype (a normalising transform's floats, feature vectors) pass unchanged.
    """
    return [TaskData(as_model_input(t.support_x), t.support_y, as_model_input(t.query_x), t.query_y) for t in tasks]


class DatasetTaskSampler(TaskSampler):
    """A :class:`TaskSampler` over an :class:`EpisodeDataset`, optionally fed by DataLoader workers.

    ``sample(n)`` returns the next ``n`` tasks in index order; the state is the next index, so a
    checkpoint resumes exactly, whatever the number of workers.
    """

    def __init__(
        self,
        episodes: EpisodeDataset,
        workers: int = 0,
        prefetch: int = 64,
        normalize: tuple[Sequence[float], Sequence[float]] | None = None,
    ) -> None:
        super().__init__(episodes.seed)
        if workers < 0:
            raise DataError(f"workers={workers} must be >= 0.")
        self.episodes, self.workers, self.prefetch = episodes, workers, prefetch
        self.normalize = None if normalize is None else tuple(torch.tensor(v).view(-1, 1, 1) for v in normalize)
        self.next_index = 0
        self._buffer: list[TaskData] = []
        self._iterator: Any = None

    def _fill(self, needed: int) -> None:
        while len(self._buffer) < needed:
            if self._iterator is None:
                start = self.next_index + len(self._buffer)
                indices = range(start, start + 1_000_000_000)  # tasks are a function of their index
                # the loader's own generator: creating an iterator draws a base seed from it, which from
                # torch's global generator would shift that generator on every resume (tasks are seeded
                # per index anyway, so the base seed only names worker seeds)
                generator = torch.Generator().manual_seed(
                    int(np.random.SeedSequence([self.seed, start]).generate_state(1)[0])
                )
                loader = DataLoader(
                    _Indexed(self.episodes, indices),
                    batch_size=1,
                    num_workers=self.workers,
                    collate_fn=collate_tasks,
                    prefetch_factor=None if self.workers == 0 else max(2, self.prefetch // max(self.workers, 1)),
                    persistent_workers=False,
                    generator=generator,
                )
                self._iterator = iter(loader)
            self._buffer.extend(next(self._iterator))

    def sample(self, n: int) -> list[TaskData]:
        self._fill(n)
        tasks, self._buffer = self._buffer[:n], self._buffer[n:]
        self.next_index += n
        if self.normalize is not None:
            mean, std = self.normalize
            tasks = [
                TaskData((t.support_x - mean) / std, t.support_y, (t.query_x - mean) / std, t.query_y) for t in tasks
            ]
        return tasks

    def sample_task(self) -> TaskData:
        return self.sample(1)[0]

    def state_dict(self) -> dict[str, Any]:
        return {"next_index": self.next_index}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.next_index = int(state["next_index"])
        self._buffer, self._iterator = [], None


class _Indexed(Dataset):
    def __init__(self, episodes: EpisodeDataset, indices: range) -> None:
        self.episodes, self.indices = episodes, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> TaskData:
        return self.episodes[self.indices[i]]
