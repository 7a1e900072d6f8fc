"""Lazily loaded images for the CLI sources ``folder:PATH``, ``csv:FILE`` and ``omniglot:PATH``.

``folder:ROOT`` is one sub-folder per class (the test split is every fifth class);
``csv:FILE`` is the split-file layout of miniImageNet and its kin: ``filename,label`` rows, the
images in ``images/`` beside the file (or ``csv:FILE@ROOT``); its test split is the sibling
``test.csv``.  Images are decoded when a task needs them, so a miniImageNet-sized set trains
in bounded memory.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from metaopt.data.dataset import DatasetTaskSampler, EpisodeDataset
from metaopt.data.images import IMAGE_SUFFIXES, eight_bit, image_to_tensor, omniglot_files
from metaopt.errors import DataError


class ImageFiles(Dataset):
    """``(image, label)`` items read from files on access (grey or RGB, resized to ``size``)."""

    def __init__(self, files: list[tuple[Path, int]], classes: list[str], size: int, channels: int) -> None:
        self.files, self.classes, self.size, self.channels = files, classes, size, channels
        self.targets = [label for _, label in files]
        self.samples = [(str(path), label) for path, label in files]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.files[index]
        try:
            with Image.open(path) as img:
                img = eight_bit(img, repr(str(path))).convert("L" if self.channels == 1 else "RGB")
                img = img.resize((self.size, self.size), Image.Resampling.LANCZOS)
                array = np.asarray(img, dtype=np.uint8).copy()
        except (UnidentifiedImageError, OSError) as exc:
            raise DataError(f"cannot read image {str(path)!r}: {exc}. Remove or replace that file.") from exc
        tensor = torch.from_numpy(array)
        return (tensor.unsqueeze(0) if tensor.dim() == 2 else tensor.permute(2, 0, 1)), label


class OmniglotImages(Dataset):
    """Omniglot characters decoded on first use and kept as ``uint8`` (strokes 255 on 0).

    The PNG bytes of a zip are held undecoded (a few MiB); each worker keeps its own cache of
    decoded images (784 bytes each at 28 px).
    """

    def __init__(self, files: dict[str, list[tuple[str, bytes | Path]]], size: int) -> None:
        self.classes = list(files)
        self.items = [(where, data, label) for label, name in enumerate(self.classes) for where, data in files[name]]
        self.targets = [label for _, _, label in self.items]
        self.size = size
        self._cache: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        where, data, label = self.items[index]
        if index not in self._cache:
            grey = image_to_tensor(data, self.size, 1, True, where)  # strokes 1.0, as the eager reader
            self._cache[index] = (grey * 255).round().to(torch.uint8)
        return self._cache[index], label


def folder_files(root: Path, split: str) -> tuple[list[tuple[Path, int]], list[str]]:
    """Files and class names of ``root/<class>/<images>``; ``test`` is every fifth class."""
    names = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not names:
        raise DataError(f"{str(root)!r} has no class sub-folders; expected root/<class>/<image files>.")
    if split == "test" and len(names) < 5:  # it used to be every class: the training classes, reported as "test"
        raise DataError(
            f"{str(root)!r} has {len(names)} classes; the test split of folder: data is every fifth class "
            f"(sorted by name), so it needs at least 5 classes (5 x ways for full tasks). Add classes, or train without --eval-every "
            "(metaopt eval --split train scores the training classes knowingly: memorisation, not few-shot)."
        )
    if split != "all":
        names = [n for i, n in enumerate(names) if (i % 5 == 4) == (split == "test")]
    files = []
    for label, name in enumerate(names):
        images = sorted(p for p in (root / name).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise DataError(f"class folder {str(root / name)!r} holds no images ({', '.join(IMAGE_SUFFIXES)}).")
        files += [(p, label) for p in images]
    return files, names


def nesting_hint(root: Path, names: list[str]) -> str:
    """Advice when the class folders hold sub-folders of images: the classes may be one level deeper."""
    for name in names:
        subs = sorted(p for p in (root / name).iterdir() if p.is_dir())
        if len(subs) >= 2 and any(any(q.suffix.lower() in IMAGE_SUFFIXES for q in sub.iterdir()) for sub in subs):
            return (
                f" {str(root / name)!r} holds sub-folders of images ({subs[0].name}, {subs[1].name}, ...): if they "
                f"are the classes, the folder is nested one level deeper than expected; use --data folder:{root / name}."
            )
    return ""


def csv_files(spec_path: str, split: str) -> tuple[list[tuple[Path, int]], list[str]]:
    """Rows ``filename,label`` (a header line is skipped); images under ROOT (``FILE@ROOT``),
    else ``images/`` beside the file, else the file's folder.  ``test``: the sibling ``test.csv``."""
    file_part, _, root_part = spec_path.partition("@")
    path = Path(file_part)
    if split == "test":
        if path.name == "test.csv":
            raise DataError(
                f"csv:{file_part} trains on test.csv, which is also its test split (the sibling test.csv): evaluation "
                "would score the training classes. Train on train.csv (miniImageNet layout: train.csv, val.csv, test.csv)."
            )
        path = path.with_name("test.csv")
        if not path.is_file():
            raise DataError(
                f"the test split of csv:{file_part} is the sibling file {str(path)!r}, which does not exist; "
                "put the test classes there (miniImageNet layout: train.csv, val.csv, test.csv)."
            )
    if not path.is_file():
        raise DataError(f"split file {str(path)!r} does not exist.")
    root = (
        Path(root_part) if root_part else (path.parent / "images" if (path.parent / "images").is_dir() else path.parent)
    )
    rows = []
    with open(path, newline="") as fh:
        for number, row in enumerate(csv.reader(fh), start=1):
            if not row or (number == 1 and row[0].strip().lower() in ("filename", "file", "path", "image")):
                continue
            if len(row) < 2:
                raise DataError(f"{str(path)!r} line {number}: expected 'filename,label'; got {row}.")
            rows.append((row[0].strip(), row[1].strip()))
    names = sorted({label for _, label in rows})
    index = {name: i for i, name in enumerate(names)}
    files = [(root / filename, index[label]) for filename, label in rows]
    missing = [str(p) for p, _ in files[:1000] if not p.is_file()]
    if missing:
        raise DataError(
            f"{len(missing)} files listed in {str(path)!r} are missing under {str(root)!r}, e.g. {missing[0]!r}."
        )
    return files, names


def augmentation() -> Any:
    """Small random affine distortions, as Siamese one-shot nets used (training split only)."""
    from torchvision.transforms import v2

    return v2.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1), shear=5)


def file_sampler(
    kind: str,
    path: str,
    *,
    split: str,
    ways: int,
    shots: int,
    query: int,
    seed: int,
    image_size: int,
    channels: int,
    rotations: bool,
    augment: bool,
    workers: int,
    normalize: tuple[list[float], list[float]] | None,
    characters: dict[str, list[tuple[str, bytes | Path]]] | None = None,
    within_alphabet: bool = False,
) -> DatasetTaskSampler:
    """The lazily loaded task sampler of a ``folder:``, ``csv:`` or ``omniglot:`` source.

    For Omniglot ``characters`` are the split's classes (:func:`omniglot_files`, filtered)."""
    training = split != "test"
    groups = None
    if kind == "omniglot":
        dataset: Dataset = OmniglotImages(characters if characters is not None else omniglot_files(path), image_size)
        groups = {label: name.split("/")[0] for label, name in enumerate(dataset.classes)}  # alphabets
    else:
        files, names = folder_files(Path(path), split) if kind == "folder" else csv_files(path, split)
        if kind == "folder" and ways > len(names) * (4 if rotations and training else 1):
            raise DataError(
                f"ways={ways} is larger than the {len(names)} classes of the {split} split of {path!r} "
                f"({', '.join(names[:5])}); lower --ways or add classes.{nesting_hint(Path(path), names)}"
            )
        dataset = ImageFiles(files, names, image_size, channels)
    episodes = EpisodeDataset(
        dataset,
        ways=ways,
        shots=shots,
        query=query,
        seed=seed,
        rotations=rotations and training,
        transform=augmentation() if augment and training else None,
        groups=groups,
        within_group=within_alphabet,
    )
    return DatasetTaskSampler(episodes, workers=workers, normalize=normalize)
