"""``metaopt export RUN``: the meta-learned weights as a plain state dict for the model's own class.

A timm backbone (``HeadedModel(body=timm model without classifier, head=Linear)``) is written
with timm's own key names (``body.`` dropped, ``head.`` renamed to the model's classifier), so
``timm.create_model(name, num_classes=ways, in_chans=C)`` loads it with ``strict=True``, ``C``
being the run's input channels.  ``model.json`` records what the inputs must be: channels, image
size, and the normalisation (mean/std, or none: float32 in [0, 1]) the run trained with.
metaopt's own models (conv4, the MLP, a user's ``HeadedModel``) keep their keys.  ``model.json``
also says how the run adapts (inner steps, rate, optimizer, plugins); plugin-owned modules (a
hypernetwork, learned inner rates), which are not part of the model, go beside the weights in
``model.plugin_modules.pt``, named in ``model.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from metaopt.checkpoint import save_atomic
from metaopt.errors import CheckpointError, ConfigError
from metaopt.models import HeadedModel, has_batchnorm
from metaopt.rundir import disk_error


def timm_classifier_name(body: nn.Module) -> str | None:
    """The classifier's attribute path of a timm model (``fc``, ``head.fc``, ...), else None."""
    cfg = getattr(body, "pretrained_cfg", None) or getattr(body, "default_cfg", None) or {}
    name = cfg.get("classifier")
    return name if isinstance(name, str) and name else None


def export_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The state dict to write and a description of how to load it."""
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    classifier = timm_classifier_name(model.body) if isinstance(model, HeadedModel) else None
    if classifier is None:
        return state, {"format": "metaopt", "keys": "as in the metaopt model (body.*, head.*)"}
    renamed = {}
    for key, value in state.items():
        if key.startswith("body."):
            renamed[key[len("body.") :]] = value
        elif key.startswith("head."):
            renamed[classifier + "." + key[len("head.") :]] = value
        else:  # pragma: no cover - HeadedModel has only body and head
            raise ConfigError(f"unexpected key {key!r} in a timm HeadedModel.")
    return renamed, {"format": "timm", "classifier": classifier}


def own_model_constructor(config: Any) -> str:
    """The call that builds a metaopt model as ``metaopt train`` built it (``auto`` resolved)."""
    from metaopt.models import OWN_IMAGE_MODELS

    if config.regression and config.model in ("auto", "mlp"):
        return "metaopt.create_model('mlp')"
    name = "conv4" if config.model == "auto" else config.model
    if name in OWN_IMAGE_MODELS:
        return (
            f"metaopt.create_model({name!r}, num_classes={config.ways}, img_size={config.image_size}, "
            f"in_chans={config.channels or 1})"
        )
    return f"metaopt.create_model({name!r}, ...)"  # a model the user registered: its own arguments


def input_description(config: Any, model: nn.Module) -> dict[str, Any]:
    """What the exported model expects: shape, value range, and the normalisation of training."""
    from metaopt.trainer import data_normalization

    if config.regression:
        return {"shape": [1], "dtype": "float32 (sinusoid x in [-5, 5])", "normalize": None}
    stats = data_normalization(config, model)
    return {
        "shape": [config.channels or 1, config.image_size, config.image_size],
        "dtype": "float32, pixels scaled to [0, 1]",
        "normalize": None if stats is None else {"mean": list(stats[0]), "std": list(stats[1])},
    }


def adaptation(config: Any) -> dict[str, Any]:
    """How the run adapts to a task: what a user needs, besides the weights, to adapt as it did."""
    from metaopt.config import plugin_specs

    return {
        "inner_steps": config.inner_steps if config.eval_inner_steps is None else config.eval_inner_steps,
        "inner_lr": config.inner_lr,
        "inner_optimizer": config.inner_optimizer,
        "first_order": config.first_order,
        "plugins": [{"name": name, **options} for name, options in plugin_specs(config.plugins)],
    }


def export_run(run_dir: str | Path, out: str | Path | None = None, checkpoint: str = "latest") -> Path:
    """Write ``RUN/export/model.pt`` (or ``out``) and ``model.json`` beside it; return the weights' path.

    ``checkpoint``: ``latest``, ``best`` or a checkpoint file of the run (:func:`metaopt.trainer.checkpoint_path`)."""
    from metaopt.trainer import checkpoint_path, load_checkpoint

    config, learner, saved = load_checkpoint(run_dir, checkpoint_path(run_dir, checkpoint))
    state, how = export_state(learner.model)
    path = Path(out) if out is not None else Path(run_dir) / "export" / "model.pt"
    try:
        save_atomic(state, path)
    except (OSError, RuntimeError) as exc:
        raise CheckpointError(
            f"{disk_error(exc, path, 'write the export')} Write it elsewhere with --out FILE."
        ) from exc
    channels = config.channels or 1
    if how["format"] == "timm":
        how["load"] = (
            f"timm.create_model({config.model!r}, num_classes={config.ways}, in_chans={channels})"
            f".load_state_dict(torch.load({str(path)!r}))"
        )
    else:
        how["load"] = f"{own_model_constructor(config)}.load_state_dict(torch.load({str(path)!r}))"
    how.update(
        model=config.model,
        ways=config.ways,
        image_size=config.image_size,
        channels=channels,
        bn_policy=config.bn_policy,
        inputs=input_description(config, learner.model),
        adaptation=adaptation(config),
        checkpoint={"chosen": checkpoint, "iteration": int(saved["iteration"])},
    )
    if config.bn_policy == "transductive" and has_batchnorm(learner.model):
        how["after_load"] = "metaopt.models.use_batch_statistics(model)"
        how["batchnorm"] = (
            "the run normalised with each batch's statistics and never trained running statistics: after "
            "loading, call metaopt.models.use_batch_statistics(model), or eval-mode BatchNorm uses the initial "
            "ones (mean 0, variance 1) and gives other outputs than the learner's. Feed whole batches."
        )
    if len(learner.plugin_modules):
        modules_path = path.with_name(path.stem + ".plugin_modules.pt")
        modules_state = {k: v.detach().cpu().clone() for k, v in learner.plugin_modules.state_dict().items()}
        try:
            save_atomic(modules_state, modules_path)
        except (OSError, RuntimeError) as exc:
            raise CheckpointError(f"{disk_error(exc, modules_path, 'write the plugin modules')}") from exc
        how["plugin_modules"] = {
            "file": str(modules_path),
            "modules": sorted(learner.plugin_modules),
            "note": (
                "this run adapts with these learned modules (inner rates, a hypernetwork): the weights alone, "
                "adapted with inner_lr, are another learner. metaopt.trainer.load_run(RUN) rebuilds the run's "
                "whole learner; or build MetaLearner(model, plugins, ...) as in 'adaptation' and "
                "learner.plugin_modules.load_state_dict(torch.load(file))."
            ),
        }
    try:
        path.with_suffix(".json").write_text(json.dumps(how, indent=2))
    except OSError as exc:
        raise disk_error(exc, path.with_suffix(".json"), "write the export's description") from exc
    return path
