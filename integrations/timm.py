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
    try:  # models with a fixed input grid (ViT, DeiT, Swin, ...) are built for img_size
        body = timm.create_model(name, img_size=img_size, **kwargs)
    except TypeError:
        body = timm.create_model(name, **kwargs)
    if pretrained_path is not None:
        load_pretrained(body, pretrained_path)
    head = nn.Linear(_feature_dim(body, in_chans, img_size), num_classes)
    return HeadedModel(body, head)


def load_pretrained(body: nn.Module, path: str | Path) -> None:
    """Load a local timm state dict into ``body``, ignoring classifier weights."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"pretrained_path {str(path)!r} is not a file.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot read pretrained weights {str(path)!r} safely: {exc}") from exc
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    classifier = getattr(body, "default_cfg", {}).get("classifier", "fc")
    state = {k: v for k, v in state.items() if not k.startswith(classifier + ".")}
    missing, unexpected = body.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"pretrained weights {str(path)!r} do not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}."
        )
