"""Hugging Face Trainer: the same meta-gradient as MetaLearner; save_model -> reload -> identical evaluation."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the transformers extra is not installed")

from metaopt import MetaLearner, create_plugin  # noqa: E402
from metaopt.integrations.transformers import PLUGIN_STATE_FILE, LogitsOf, MetaTrainer  # noqa: E402


def _vit():
    """A tiny ViT built from a config (no download); eager attention has a double backward."""
    torch.manual_seed(0)
    config = transformers.ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=1,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        num_labels=3,
        attn_implementation="eager",
    )
    return LogitsOf(transformers.ViTForImageClassification(config)).double()


def _tasks(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(6, 1, 8, 8, generator=g, dtype=torch.float64),
            torch.arange(3).repeat(2),
            torch.randn(9, 1, 8, 8, generator=g, dtype=torch.float64),
            torch.arange(3).repeat(3),
        )
        for _ in range(n)
    ]


def _plugins():
    return [create_plugin("shot"), create_plugin("sharp_maml", rho_inner=0.05, rho_outer=0.05)]


def _args(out, **kw):
    base = dict(output_dir=str(out), per_device_train_batch_size=2, per_device_eval_batch_size=3, max_steps=1)
    base.update(max_grad_norm=0.0, report_to=[], use_cpu=True, save_strategy="no", logging_steps=1)
    return transformers.TrainingArguments(**{**base, **kw})


class FirstGradients(transformers.TrainerCallback):
    def __init__(self, model):
        self.model, self.grads = model, None

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.grads is None:
            self.grads = {n: p.grad.detach().clone() for n, p in self.model.named_parameters()}


def test_first_step_meta_gradient_equals_metalearner_backward(tmp_path):
    model = _vit()
    reference = copy.deepcopy(model)
    learner = MetaLearner(model, _plugins(), inner_steps=2, inner_lr=0.1)
    spy = FirstGradients(model)
    trainer = MetaTrainer(learner=learner, args=_args(tmp_path), train_dataset=_tasks(2), callbacks=[spy])
    trainer.train()
    MetaLearner(reference, _plugins(), inner_steps=2, inner_lr=0.1).backward(_tasks(2))
    for name, p in reference.named_parameters():
        assert (spy.grads[name] - p.grad).abs().max() < 1e-12, name
    assert max(g.abs().max() for g in spy.grads.values()) > 0


def test_save_model_then_reload_evaluates_identically_with_plugin_state(tmp_path):
    learner = MetaLearner(_vit(), [create_plugin("maml_pp", msl_iters=10)], inner_steps=2, inner_lr=0.1)
    trainer = MetaTrainer(
        learner=learner, args=_args(tmp_path, max_steps=2), train_dataset=_tasks(4), eval_dataset=_tasks(3, 1)
    )
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))
    assert (tmp_path / "saved" / PLUGIN_STATE_FILE).is_file()
    before = trainer.evaluate()
    fresh = MetaLearner(_vit(), [create_plugin("maml_pp", msl_iters=10)], inner_steps=2, inner_lr=0.1)
    from safetensors.torch import load_file

    fresh.load_state_dict(load_file(str(tmp_path / "saved" / "model.safetensors")))
    fresh.load_plugin_state(torch.load(tmp_path / "saved" / PLUGIN_STATE_FILE, weights_only=True))
    assert fresh.get_plugin("maml_pp").iteration == 2  # the learned rates' schedule continues
    after = MetaTrainer(learner=fresh, args=_args(tmp_path / "other"), eval_dataset=_tasks(3, 1)).evaluate()
    assert before == after and "eval_accuracy" in after


def test_resume_from_checkpoint_restores_the_plugin_state(tmp_path):
    def trainer(steps):
        learner = MetaLearner(_vit(), [create_plugin("maml_pp", msl_iters=10)], inner_steps=2, inner_lr=0.1)
        args = _args(tmp_path, max_steps=steps, save_strategy="steps", save_steps=1)
        return MetaTrainer(learner=learner, args=args, train_dataset=_tasks(8)), learner

    first, _ = trainer(2)
    first.train()
    assert (tmp_path / "checkpoint-2" / PLUGIN_STATE_FILE).is_file()
    second, learner = trainer(3)
    second.train(resume_from_checkpoint=True)
    assert learner.get_plugin("maml_pp").iteration == 3  # 2 restored + 1 more step
