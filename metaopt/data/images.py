"""Readers: the official Omniglot zip archives and class-per-folder image collections."""

from __future__ import annotations

import io
import zipfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from metaopt.data.episodes import ClassImages
from metaopt.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff")


#: PIL modes of 16-bit grey images (PNG, TIFF); "I" is how PIL often opens a 16-bit PNG
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def eight_bit(img: Image.Image, where: str) -> Image.Image:
    """``img`` in an 8-bit mode with its range kept: a 16-bit grey image is scaled by 255/65535.

    PIL's own ``convert("L")`` clips a 16-bit image at 255, so everything brighter than 0.4% of
    its range became white (a 16-bit microscope or X-ray image: nearly all white, without a word).
    """
    if img.mode in SIXTEEN_BIT_MODES:
        values = np.asarray(img, dtype=np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise DataError(
                f"image {where} holds values {values.min()}..{values.max()} (mode {img.mode}), outside 16 bits; "
                "save it as an 8- or 16-bit image, or build tasks with EpisodeDataset and your own transform."
            )
        return Image.fromarray(np.rint(values * (255.0 / 65535.0)).astype(np.uint8), mode="L")
    if img.mode == "F":
        raise DataError(
            f"image {where} has float pixels (mode F), which have no fixed range to scale to [0, 1]; save it as "
            "an 8- or 16-bit image, or build tasks with EpisodeDataset and your own transform."
        )
    return img


def image_to_tensor(data: bytes | Path, size: int, channels: int, invert: bool, where: str) -> torch.Tensor:
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as img:
            img = eight_bit(img, where).convert("L" if channels == 1 else "RGB")
            img = img.resize((size, size), Image.Resampling.LANCZOS)
            arr = np.asarray(img, dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"cannot read image {where}: {exc}. Remove or replace that file.") from exc
    if invert:
        arr = 1.0 - arr
    t = torch.from_numpy(arr.copy())
    return t.unsqueeze(0) if channels == 1 else t.permute(2, 0, 1)


def with_rotations(classes: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, imgs in classes.items():
        for k in range(4):
            out[f"{name}@rot{90 * k}"] = torch.rot90(imgs, k, dims=(2, 3)) if k else imgs
    return out


def omniglot_files(path: str | Path, alphabets: list[str] | None = None) -> dict[str, list[tuple[str, bytes | Path]]]:
    """The PNGs of an official Omniglot archive (``images_background*.zip``) or its unpacked
    folder, per class ``alphabet/characterNN``, undecoded (zip members as bytes, a folder as paths)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"Omniglot path {str(path)!r} does not exist; point --data at images_background*.zip.")
    files: dict[str, list[tuple[str, bytes | Path]]] = defaultdict(list)
    if path.is_file():
        try:
            archive = zipfile.ZipFile(path)
        except zipfile.BadZipFile as exc:
            raise DataError(f"{str(path)!r} is not a readable zip archive: {exc}.") from exc
        with archive:
            for name in sorted(archive.namelist()):
                parts = name.split("/")
                if len(parts) >= 3 and name.lower().endswith(".png"):
                    files[f"{parts[-3]}/{parts[-2]}"].append((name, archive.read(name)))
    else:
        for png in sorted(path.rglob("*.png")):
            files[f"{png.parent.parent.name}/{png.parent.name}"].append((str(png), png))
    if alphabets is not None:
        wanted = set(alphabets)
        files = {k: v for k, v in files.items() if k.split("/")[0] in wanted}
    if not files:
        raise DataError(f"no Omniglot images (alphabet/character/*.png) found in {str(path)!r}.")
    return dict(sorted(files.items()))


def load_omniglot(
    path: str | Path, size: int = 28, rotations: bool = False, alphabets: list[str] | None = None
) -> dict[str, torch.Tensor]:
    """Read an official Omniglot archive (``images_background*.zip``) or its unpacked folder.

    Classes are ``alphabet/characterNN``; strokes become 1.0 on a 0.0 background; with
    ``rotations`` each class also appears rotated by 90/180/270 degrees as a new class.
    """
    files = omniglot_files(path, alphabets)
    classes = {
        cls: torch.stack([image_to_tensor(data, size, 1, True, where) for where, data in items])
        for cls, items in sorted(files.items())
    }
    return with_rotations(classes) if rotations else classes


def omniglot_alphabets(classes: ClassImages) -> list[str]:
    return sorted({name.split("/")[0] for name in classes})


def channels_of(files: list[Path]) -> int:
    """3 if any of ``files`` has colour (not only a colour mode: channels that differ), else 1."""
    for file in files:
        try:
            with Image.open(file) as img:
                if img.mode not in ("1", "L", "LA", "I", "I;16", "F"):
                    rgb = np.asarray(img.convert("RGB"), dtype=np.int16)
                    if (rgb[..., 0] != rgb[..., 1]).any() or (rgb[..., 1] != rgb[..., 2]).any():
                        return 3
        except (UnidentifiedImageError, OSError) as exc:
            raise DataError(f"cannot read image {str(file)!r}: {exc}. Remove or replace that file.") from exc
    return 1


def detect_channels(path: str | Path, probe: int = 8) -> int:
    """3 if any of the first ``probe`` images (two per class folder) has colour, else 1."""
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"image folder {str(root)!r} does not exist or is not a folder.")
    files: list[Path] = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        files += sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[:2]
        if len(files) >= probe:
            break
    return channels_of(files[:probe])


def load_image_folder(
    path: str | Path, size: int = 28, channels: int | None = None, invert: bool = False
) -> dict[str, torch.Tensor]:
    """Read ``root/<class>/<image>`` (any depth below the class folder) into class tensors.

    ``channels``: 1 (grey) or 3 (RGB); default: detected by the rule ``metaopt train --data
    folder:`` uses (:func:`detect_channels`: 3 if the images have colour, else 1).
    """
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"image folder {str(root)!r} does not exist or is not a folder.")
    if channels is None:
        channels = detect_channels(root)
    classes = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise DataError(f"class folder {str(folder)!r} holds no images ({', '.join(IMAGE_SUFFIXES)}).")
        classes[folder.name] = torch.stack([image_to_tensor(p, size, channels, invert, str(p)) for p in images])
    if not classes:
        raise DataError(f"{str(root)!r} has no class sub-folders; expected root/<class>/<image files>.")
    return classes
