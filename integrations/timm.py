"""Any ``timm`` backbone as a few-shot model: ``body`` = timm model without classifier, fresh ``head``.

Nothing is downloaded: ``pretrained_path`` loads a local state dict (safe deserialisation).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from metaopt.errors import CheckpointError, ConfigError, suggest
from metaopt.models import HeadedModel

try:
    import timm

    TIMM_AVAILABLE = True
except ImportError:  # pragma: no cover - timm is a hard dependency, but keep the fence
    TIMM_AVAILABLE = False


def _require_timm() -> None:
    if not TIMM_AVAILABLE:
        raise ConfigError("timm is not installed; `pip install timm` to use timm backbones.")


def _feature_dim(body: nn.Module, in_chans: int, img_size: int) -> int:
    was_training = body.training
    body.eval()
    with torch.no_grad():
        out = body(torch.zeros(1, in_chans, img_size, img_size))
    body.train(was_training)
    if out.dim() != 2:
        raise ConfigError(
            f"timm model returned features of shape {tuple(out.shape)} with num_classes=0; expected [N, D]."
        )
    return int(out.shape[1])


def backbone(
    name: str,
    num_classes: int = 5,
    in_chans: int = 3,
    img_size: int = 84,
    pretrained_path: str | Path | None = None,
    fused_attn: bool = False,
    **timm_kwargs: Any,
) -> HeadedModel:
    """A timm model by name with a fresh ``nn.Linear(features, num_classes)`` head.

    ``fused_attn=False`` (default) turns timm's fused scaled-dot-product attention off
    before the model is built: the fused kernel has no double backward, which second-order
    meta-gradients need.  ``pretrained_path`` is a local ``state_dict`` file; the
    checkpoint's classifier weights are ignored.
    """
    _require_timm()
    if not timm.is_model(name):
        close = suggest(name, timm.list_models())
        raise ConfigError(f"unknown timm model {name!r}.{close} See timm.list_models() for the names timm knows.")
    if not fused_attn:
        timm.layers.set_fused_attn(False)
    if "pretrained" in timm_kwargs:
        raise ConfigError(
            "pass pretrained_path=<local file> instead of pretrained=...; metaopt never downloads weights."
        )
    kwargs = dict(pretrained=False, num_classes=0, in_chans=in_chans, **timm_kwargs)
    if pretrained_path is not None:
        # timm's own loader: a local file (nothing is downloaded), the first conv adapted to
        # in_chans, the classifier dropped (num_classes=0): an ordinary ImageNet checkpoint fits
        path = Path(pretrained_path)
        if not path.is_file():
            raise ConfigError(f"pretrained_path {str(path)!r} is not a file.")
        kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": str(path)})
    try:  # models with a fixed input grid (ViT, DeiT, Swin, ...) are built for img_size
        body = _create(name, kwargs, img_size=img_size)
    except TypeError:
        body = _create(name, kwargs)
    head = nn.Linear(_feature_dim(body, in_chans, img_size), num_classes)
    return HeadedModel(body, head)


def _create(name: str, kwargs: dict[str, Any], **extra: Any) -> nn.Module:
    try:
        return timm.create_model(name, **kwargs, **extra)
    except (RuntimeError, ValueError, OSError) as exc:  # a checkpoint that does not fit even after timm's adaptation
        if not kwargs.get("pretrained"):
            raise
        file = kwargs["pretrained_cfg_overlay"]["file"]
        raise CheckpointError(f"pretrained weights {file!r} do not fit timm model {name!r}: {str(exc)[:400]}") from exc


def normalization(model: nn.Module, channels: int) -> tuple[list[float], list[float]] | None:
    """Mean and std of a timm model's pretrained config, for ``channels`` input channels.

    One channel (grey images into a model whose first conv timm summed over RGB) gets the mean of
    the RGB values.  None for a model without a timm pretrained config.
    """
    body = getattr(model, "body", model)
    cfg = getattr(body, "pretrained_cfg", None)
    if not TIMM_AVAILABLE or not cfg:
        return None
    data = timm.data.resolve_data_config(model=body)
    mean, std = list(data["mean"]), list(data["std"])
    if channels == 1 and len(mean) == 3:
        mean, std = [sum(mean) / 3], [sum(std) / 3]
    return mean, std
