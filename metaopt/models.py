"""Models with one interface: ``body`` (features) + ``head`` (a Linear), and a name registry."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from metaopt.errors import ConfigError, suggest


class HeadedModel(nn.Module):
    """``head(body(x))``; ``forward(x, return_features=True)`` also returns the features.

    Plugins that adapt only the head (HyperMAML) need this split; wrap your own model as
    ``HeadedModel(body, nn.Linear(dim, n_out))``.
    """

    def __init__(self, body: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        if not isinstance(head, nn.Linear):
            raise ConfigError(f"head must be an nn.Linear; got {type(head).__name__}.")
        self.body = body
        self.head = head

    def forward(self, x: torch.Tensor, return_features: bool = False) -> Any:
        features = self.body(x)
        out = self.head(features)
        return (features, out) if return_features else out


def conv_block(in_channels: int, out_channels: int, pool: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels), nn.ReLU()]
    return nn.Sequential(*layers, *([nn.MaxPool2d(2)] if pool else []))


def conv4(num_classes: int = 5, in_chans: int = 1, hidden: int = 64, img_size: int = 28, pools: int = 4) -> HeadedModel:
    """The standard few-shot 4 x [conv3x3-hidden, BN, ReLU, maxpool] network (Vinyals et al.).

    ``pools``: how many blocks end in a 2x2 max-pool (the first ones); with ``pools=3`` the last
    block keeps its map (3 x 3 at 28 px: a 576-d embedding instead of 64-d, at almost the same cost).
    """
    if not 0 <= pools <= 4:
        raise ConfigError(f"pools={pools!r} must be between 0 and 4 (how many of the 4 blocks end in a max-pool).")
    blocks = [conv_block(in_chans if i == 0 else hidden, hidden, pool=i < pools) for i in range(4)]
    with torch.no_grad():
        dim = nn.Sequential(*blocks)(torch.zeros(1, in_chans, img_size, img_size)).numel()
    return HeadedModel(nn.Sequential(*blocks, nn.Flatten()), nn.Linear(dim, num_classes))


def conv4_3pool(**kwargs: Any) -> HeadedModel:
    """conv4 whose last block keeps its spatial map (``conv4(pools=3)``)."""
    return conv4(pools=3, **kwargs)


def mlp(num_classes: int = 1, in_features: int = 1, hidden: tuple[int, ...] = (40, 40)) -> HeadedModel:
    """The MAML sinusoid regressor: in -> 40 -> 40 -> out with ReLU."""
    layers: list[nn.Module] = []
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    return HeadedModel(nn.Sequential(*layers), nn.Linear(width, num_classes))


def mlp_paper(num_classes: int = 1, in_features: int = 1, hidden: tuple[int, ...] = (40, 40)) -> HeadedModel:
    """:func:`mlp` initialised as the MAML authors' code does: weights from a normal with std 0.01
    truncated at two standard deviations, biases 0 (PyTorch's default ``nn.Linear`` draws uniform
    weights of scale 1/sqrt(fan_in), 0.16 for the 40-wide layers)."""
    model = mlp(num_classes, in_features, hidden)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.01, a=-0.02, b=0.02)
                nn.init.zeros_(module.bias)
    return model


_MODELS: dict[str, Callable[..., nn.Module]] = {
    "conv4": conv4,
    "conv4_3pool": conv4_3pool,
    "mlp": mlp,
    "mlp_paper": mlp_paper,
}
#: the sinusoid regressors (one input, one output)
REGRESSION_MODELS = ("mlp", "mlp_paper")
#: metaopt's own image networks: built with ``in_chans`` (timm models also take ``pretrained_path``)
OWN_IMAGE_MODELS = ("conv4", "conv4_3pool")


def use_batch_statistics(model: nn.Module) -> nn.Module:
    """Make every BatchNorm of ``model`` normalise with the statistics of the batch it is given, in
    ``eval()`` mode too, as a learner with ``bn_policy="transductive"`` (the default) does.

    For weights trained that way and used outside metaopt (``metaopt export``): their running
    statistics were never trained, so eval-mode BatchNorm would use the initial ones (mean 0,
    variance 1) and give other outputs than the learner's.  Call it after ``load_state_dict``.
    """
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.track_running_stats = False
            module.running_mean = module.running_var = module.num_batches_tracked = None
    return model


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def register_model(name: str, factory: Callable[..., nn.Module]) -> None:
    _MODELS[name] = factory


def list_models() -> list[str]:
    return sorted(_MODELS)


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """A registered model, or ``timm:<name>`` / any other name: a timm backbone with a fresh head."""
    if name in _MODELS:
        return _MODELS[name](**kwargs)
    from metaopt.integrations.timm import backbone

    timm_name = name.removeprefix("timm:")
    try:
        return backbone(timm_name, **kwargs)
    except ConfigError as exc:
        if name.startswith("timm:"):
            raise
        raise ConfigError(f"{exc} Built-in models: {', '.join(list_models())}.{suggest(name, _MODELS)}") from exc
