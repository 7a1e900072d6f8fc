"""Hugging Face Trainer: the same meta-gradient as MetaLearner; save_model -> reload -> identical evaluation."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the transformers extra is not installed")

from hf_trainer_job import InOrder  # noqa: E402  (tasks in order; the tiny float64 ViT and tasks, shared with the 2-process job)
from hf_trainer_job import tasks as _tasks  # noqa: E402
from hf_trainer_job import vit as _vit  # noqa: E402

from metaopt import ConfigError, MetaLearner, create_plugin  # noqa: E402
from metaopt.integrations.transformers import PLUGIN_STATE_FILE, MetaTrainer  # noqa: E402


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


class SeenInputs(torch.nn.Module):
    """Wraps a model and keeps the inputs it is given: what reaches the model."""

    def __init__(self, model):
        super().__init__()
        self.model, self.seen = model, []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return self.model(x)


def test_the_documented_trainer_path_feeds_the_model_what_the_plain_loop_does(tmp_path):
    """docs/wrap-a-script.md's MetaTrainer + EpisodeDataset over decoded (uint8) images: the Trainer's
    own collator skipped collate_tasks and the model got 0..255 pixels (loss ~1.9e4 against ~1.3)."""
    from torch.utils.data import DataLoader

    from metaopt.data import EpisodeDataset, collate_tasks

    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (30, 1, 8, 8), generator=g, dtype=torch.uint8)
    labels = torch.arange(3).repeat_interleave(10)
    dataset = [{"pixel_values": x, "labels": y} for x, y in zip(pixels, labels)]
    episodes = EpisodeDataset(
        dataset, ways=3, shots=1, query=2, labels=labels.tolist(), image_key="pixel_values", length=4
    )
    expected = [
        t for batch in DataLoader(episodes, batch_size=2, collate_fn=collate_tasks) for t in batch
    ]  # plain loop

    model = SeenInputs(_vit().float())
    learner = MetaLearner(model, inner_steps=1, inner_lr=0.1)
    trainer = MetaTrainer(
        learner=learner, args=_args(tmp_path, max_steps=1, dataloader_drop_last=True), train_dataset=episodes
    )
    trainer.train()
    assert len(model.seen) >= 3  # the learner's one-off shape check, then the tasks' forwards
    for seen in model.seen:  # (the Trainer shuffles: each input is one of the plain loop's tasks)
        assert seen.dtype == torch.float32 and float(seen.min()) >= 0.0 and float(seen.max()) <= 1.0
        assert any(torch.equal(seen, x) for t in expected for x in (t.support_x, t.query_x))


def test_raw_uint8_pixels_are_refused_with_the_fix():
    from metaopt import DataError

    task = (
        torch.zeros(3, 1, 8, 8, dtype=torch.uint8),
        torch.arange(3),
        torch.zeros(3, 1, 8, 8, dtype=torch.uint8),
        torch.arange(3),
    )
    with pytest.raises(DataError, match=r"support_x is uint8 \(raw pixels, values 0..0\).*collate_tasks"):
        MetaLearner(_vit()).backward([task])


def test_meta_trainer_warns_when_evaluation_reuses_the_training_classes(tmp_path):
    from metaopt.data import EpisodeDataset, split_classes
    from metaopt.data.splits import HeldOutWarning

    labels = torch.arange(6).repeat_interleave(3)
    dataset = [(torch.randn(1, 8, 8), int(y)) for y in labels]
    episodes = EpisodeDataset(dataset, ways=3, shots=1, query=1, labels=labels.tolist())
    learner = MetaLearner(_vit().float())
    with pytest.warns(HeldOutWarning, match="memorisation"):
        MetaTrainer(learner=learner, args=_args(tmp_path), train_dataset=episodes, eval_dataset=episodes)
    train, test = split_classes(dataset, [4, 5], labels=labels.tolist())
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", HeldOutWarning)
        MetaTrainer(
            learner=learner,
            args=_args(tmp_path),
            train_dataset=EpisodeDataset(train, ways=3, shots=1, query=1),
            eval_dataset=EpisodeDataset(test, ways=2, shots=1, query=1),
        )


@pytest.mark.slow
def test_two_processes_match_each_other_and_one_process(tmp_path):
    """Under torchrun the Trainer gave each process its own tasks and nothing averaged the meta-gradients
    (DDP's reducer never runs: learner.backward bypasses its forward), so the ranks trained different
    models without a word (2e-4 apart after 3 steps), and evaluate() logged each process's own share."""
    import json
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    job = Path(__file__).parent.parent / "hf_trainer_job.py"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    cmd += ["--master_port", str(port), str(job), str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true", "PYTHONPATH": str(job.parent)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    evals = [json.loads((tmp_path / f"eval{r}.json").read_text()) for r in range(2)]
    from hf_trainer_job import run

    single, single_eval = run(str(tmp_path / "single"), per_device=4)
    start = _vit().state_dict()
    for key, value in single.learner.state_dict().items():
        assert torch.equal(rank0[key], rank1[key]), key
        # atol: k_proj.bias has an exactly zero true gradient (softmax ignores a shift of every key), so
        # Adam moves it on round-off alone (to ~7e-7), differently for one and two processes (4e-11 apart)
        torch.testing.assert_close(rank0[key], value, rtol=1e-9, atol=1e-9, msg=key)
    assert max(float((value - start[key.removeprefix("model.")]).abs().max()) for key, value in rank0.items()) > 1e-3
    assert evals[0] == evals[1]
    for key in ("eval_query_loss", "eval_accuracy"):
        assert abs(evals[0][key] - single_eval[key]) < 1e-9, key


class OutputDtypes(torch.nn.Module):
    """Wraps a model and keeps the dtypes of its outputs: what precision the Trainer's run really used."""

    def __init__(self, model):
        super().__init__()
        self.model, self.seen = model, set()

    def forward(self, x):
        out = self.model(x)
        self.seen.add(out.dtype)
        return out


def test_bf16_reaches_the_model_and_fp16_is_refused(tmp_path):
    """TrainingArguments(bf16=True) used to be ignored (learner.backward bypassed the Trainer's autocast: float32
    throughout), and fp16=True too, where on a GPU the Trainer's scaler would unscale never-scaled gradients."""
    float_tasks = [tuple(t.float() if t.is_floating_point() else t for t in task) for task in _tasks(2)]
    seen = {}
    for bf16 in (False, True):
        model = OutputDtypes(_vit().float())
        learner = MetaLearner(model, [], inner_steps=1, inner_lr=0.1)
        MetaTrainer(learner=learner, args=_args(tmp_path / str(bf16), bf16=bf16), train_dataset=float_tasks).train()
        seen[bf16] = model.seen
        assert all(torch.isfinite(p).all() for p in learner.parameters())
        assert all(p.dtype == torch.float32 for p in learner.parameters())  # parameters stay float32
    assert seen[False] == {torch.float32} and torch.bfloat16 in seen[True]
    learner = MetaLearner(_vit().float(), [], inner_steps=1, inner_lr=0.1)
    with pytest.raises(ConfigError, match=r"fp16=True\) is not supported by metaopt.*Use bf16=True"):
        MetaTrainer(learner=learner, args=_args(tmp_path / "fp16", fp16=True), train_dataset=float_tasks)


def test_gradient_accumulation_gives_the_whole_batchs_meta_gradient(tmp_path):
    """Documented as supported, never tested: 2 micro-batches of 2 tasks must give the meta-gradient of the 4
    (with SHOT: per-task). Outer SAM cannot: each micro-batch would perturb along its own gradient (10% off)."""
    grads = {}
    for per_device, accumulate in ((4, 1), (2, 2)):
        model = _vit()
        spy = FirstGradients(model)
        args = _args(
            tmp_path / f"{accumulate}", per_device_train_batch_size=per_device, gradient_accumulation_steps=accumulate
        )
        learner = MetaLearner(model, [create_plugin("shot")], inner_steps=2, inner_lr=0.1)
        InOrder(learner=learner, args=args, train_dataset=_tasks(4), callbacks=[spy]).train()
        grads[accumulate] = spy.grads
    for name, whole in grads[1].items():
        assert (grads[2][name] - whole).abs().max() <= 1e-12 * max(g.abs().max() for g in grads[1].values()), name
    assert max(g.abs().max() for g in grads[1].values()) > 0
    outer_sam = MetaLearner(_vit(), _plugins(), inner_steps=2, inner_lr=0.1)
    with pytest.raises(ConfigError, match=r"gradient_accumulation_steps=2 with 'sharp_maml', which replaces the outer"):
        MetaTrainer(learner=outer_sam, args=_args(tmp_path, gradient_accumulation_steps=2), train_dataset=_tasks(4))
