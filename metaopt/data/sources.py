"""Build a sampler from a data spec string, as the CLI and configs name them.

Specs: ``sinusoid``, ``glyphs``, ``omniglot:PATH`` (official zip or unpacked folder),
``folder:PATH`` (root/<class>/<images>), ``csv:FILE[@ROOT]`` (``filename,label`` rows; see
``metaopt.data.files``).  Splits: ``train``, ``test`` or ``all``.
For Omniglot the test split is a set of held-out alphabets (``test_alphabets``; default the
last fifth of the sorted alphabets, at least one); for folders every fifth class.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from metaopt.data.files import file_sampler
from metaopt.data.glyphs import GlyphTasks
from metaopt.data.images import omniglot_alphabets, omniglot_files
from metaopt.data.sampler import TaskSampler
from metaopt.data.sinusoid import SinusoidTasks
from metaopt.errors import ConfigError, DataError, suggest

SPLITS = ("train", "test", "all")
KINDS = ("sinusoid", "glyphs", "omniglot", "folder", "csv")


@dataclass
class DataSpec:
    kind: str
    path: Path | None
    text: str = ""  # the part after "kind:" as written (csv: FILE@ROOT)

    @property
    def regression(self) -> bool:
        return self.kind == "sinusoid"


def parse_spec(spec: str) -> DataSpec:
    kind, _, path = spec.partition(":")
    if kind not in KINDS:
        raise ConfigError(
            f"data source {spec!r} is not known; use one of sinusoid, glyphs, omniglot:PATH, folder:PATH, csv:FILE."
            + suggest(kind, KINDS)
        )
    if kind in ("omniglot", "folder", "csv"):
        if not path:
            raise ConfigError(f"data source {spec!r} needs a path, e.g. {kind}:/data/omniglot/images_background.zip.")
        if not Path(path.partition("@")[0] if kind == "csv" else path).exists():
            raise DataError(f"data path {path!r} does not exist; check the path after '{kind}:'.")
        return DataSpec(kind, Path(path), path)
    if path:
        raise ConfigError(f"data source {spec!r}: {kind} is built in and takes no path or options; use data={kind}.")
    return DataSpec(kind, None)


def split_omniglot_alphabets(alphabets: list[str], split: str, test_alphabets: list[str] | None) -> list[str]:
    if test_alphabets is None:
        n_test = max(1, math.ceil(len(alphabets) / 5)) if len(alphabets) > 1 else 0
        test_alphabets = alphabets[len(alphabets) - n_test :]
    unknown = [a for a in test_alphabets if a not in alphabets]
    if unknown:
        raise DataError(f"test_alphabets {unknown} are not in this archive; it has {alphabets}.")
    if split == "test":
        return list(test_alphabets)
    if split == "train":
        return [a for a in alphabets if a not in test_alphabets]
    return alphabets


def make_sampler(
    spec: str,
    *,
    split: str = "train",
    ways: int = 5,
    shots: int = 1,
    query: int = 15,
    seed: int = 0,
    image_size: int = 28,
    rotations: bool = False,
    test_alphabets: list[str] | None = None,
    channels: int = 1,
    normalize: tuple[list[float], list[float]] | None = None,
    augment: bool = False,
    workers: int = 0,
    within_alphabet: bool = False,
) -> TaskSampler:
    """The task sampler for ``spec`` and ``split`` (deterministic for a given ``seed``).

    ``channels``: 1 (grey) or 3 (RGB) for ``folder:``/``csv:`` data; ``normalize``: per-channel
    (mean, std) applied to image sources (a pretrained model's statistics); ``augment``: small
    random affine distortions of training images; ``workers``: DataLoader worker processes that
    decode ``folder:``/``csv:`` tasks (the same tasks for any number).
    """
    if split not in SPLITS:
        raise ConfigError(f"split={split!r} must be one of {SPLITS}.{suggest(split, SPLITS)}")
    data = parse_spec(spec)
    if rotations and data.kind in ("sinusoid", "glyphs"):
        raise ConfigError(
            f"rotations=True applies to image sources (omniglot:PATH, folder:PATH, csv:FILE); {data.kind!r} has no "
            "rotation classes. Drop --rotations."
        )
    if within_alphabet and data.kind != "omniglot":
        raise ConfigError(
            f"within_alphabet applies to omniglot:PATH data (tasks from one alphabet), not {data.kind!r}."
        )
    if (augment or workers) and data.kind not in ("folder", "csv", "omniglot"):
        raise ConfigError(
            f"augment and workers apply to the image sources omniglot:PATH, folder:PATH and csv:FILE, not {data.kind!r}."
        )
    if data.kind == "sinusoid":
        return SinusoidTasks(shots=shots, query=query, seed=seed)
    if data.kind == "glyphs":
        return GlyphTasks(
            ways=ways,
            shots=shots,
            query=query,
            split="test" if split == "test" else "train",
            size=image_size,
            seed=seed,
        )
    assert data.path is not None
    characters = None
    if data.kind == "omniglot":
        every = omniglot_files(data.path)
        alphabets = split_omniglot_alphabets(omniglot_alphabets(every), split, test_alphabets)
        characters = {name: items for name, items in every.items() if name.split("/")[0] in alphabets}
    return file_sampler(
        data.kind,
        data.text,
        split=split,
        ways=ways,
        shots=shots,
        query=query,
        seed=seed,
        image_size=image_size,
        channels=channels,
        rotations=rotations,
        augment=augment,
        workers=workers,
        normalize=normalize,
        characters=characters,
        within_alphabet=within_alphabet,
    )
