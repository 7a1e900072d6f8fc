"""Outer optimizers and schedules from timm's factories, per-group learning rates, keep-best."""

from __future__ import annotations

import json

import pytest
import torch

from metaopt.checkpoint import load_safe
from metaopt.config import TrainConfig
from metaopt.errors import ConfigError
from metaopt.trainer import Trainer


def _config(**kw):
    base = dict(data="sinusoid", shots=5, query=5, meta_batch=2, iterations=6, checkpoint_every=3)
    return TrainConfig(**{**base, **kw})


def test_timm_optimizer_and_cosine_schedule_with_warmup_resume_exactly(tmp_path):
    cfg = dict(outer_optimizer="adamw", lr_schedule="cosine", warmup_iters=2, meta_lr=1e-3)
    full = Trainer(_config(**cfg), tmp_path / "full")
    assert type(full.optimizer).__name__ == "AdamW"
    full.train(progress=False)
    lrs = [json.loads(x)["lr"] for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert lrs[0] < lrs[1] <= 1e-3 and lrs[1:] == sorted(lrs[1:], reverse=True)  # warm-up, then cosine
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12)
    # resume from the iteration-3 checkpoint: the schedule continues from the checkpoint's state
    final = tmp_path / "full" / "checkpoints" / "ckpt-00000006.pt"
    assert load_safe(final)["scheduler"] is not None
    final.unlink()
    resumed = Trainer(_config(**cfg), tmp_path / "full", resume=True)
    assert resumed.iteration == 3
    resumed.train(progress=False)
    again = [json.loads(x)["lr"] for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert again == lrs
    for a, b in zip(full.learner.parameters(), resumed.learner.parameters(), strict=True):
        assert torch.equal(a, b)


def test_param_group_learning_rates_by_prefix(tmp_path):
    trainer = Trainer(_config(plugins=["meta_sgd"], param_group_lr={"plugin_modules.meta_sgd_lr.": 1e-2}), tmp_path)
    groups = trainer.optimizer.param_groups
    assert [g["lr"] for g in groups] == [1e-3, 1e-2]
    rates = set(map(id, trainer.learner.plugin_modules.parameters()))
    assert {id(p) for p in groups[1]["params"]} == rates
    with pytest.raises(ConfigError, match="match no meta-parameter"):
        Trainer(_config(param_group_lr={"plugin_modules.nothing.": 1e-2}), tmp_path / "other")


def test_keep_best_keeps_the_checkpoint_of_the_best_eval(tmp_path):
    trainer = Trainer(_config(iterations=4, eval_every=1, eval_tasks=4, keep_best="mse"), tmp_path)
    trainer.train(progress=False)
    evals = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    best = min(evals, key=lambda r: r["eval"]["mse"])
    assert load_safe(tmp_path / "best.pt")["iteration"] == best["iteration"] == trainer.best_eval["iteration"]
    with pytest.raises(ConfigError, match="needs periodic evaluation"):
        _config(keep_best="mse").validate()


def test_eval_and_export_take_the_best_or_any_checkpoint_and_say_which(tmp_path, capsys):
    """--keep-best kept RUN/best.pt, but eval and export could only read the latest checkpoint, and their
    output did not say which weights they had scored."""
    from metaopt.cli import main

    run = tmp_path / "run"
    trainer = Trainer(_config(iterations=4, eval_every=1, eval_tasks=4, keep_best="mse", checkpoint_every=2), run)
    trainer.train(progress=False)
    best = load_safe(run / "best.pt")["iteration"]
    scored = {}
    for chosen in ("latest", "best", str(run / "checkpoints" / "ckpt-00000002.pt")):
        capsys.readouterr()
        args = ["eval", str(run), "--checkpoint", chosen, "--tasks", "4", "--no-baseline", "--no-progress", "--json"]
        assert main(args) == 0
        scored[chosen] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert scored[chosen]["checkpoint"] == chosen
    assert [r["iteration"] for r in scored.values()] == [4, best, 2]
    assert main(["export", str(run), "--checkpoint", "best"]) == 0
    assert f"the weights at iteration {best} (best checkpoint" in capsys.readouterr().out
    exported = torch.load(run / "export" / "model.pt", weights_only=True)
    saved = load_safe(run / "best.pt")["learner"]
    assert all(torch.equal(exported[k], saved["model." + k]) for k in exported)
    other = tmp_path / "other"
    Trainer(_config(iterations=2), other).train(progress=False)
    assert main(["eval", str(other), "--checkpoint", "best", "--no-progress"]) == 2
    assert "has no best.pt: it is kept by training with --keep-best" in capsys.readouterr().err


def test_a_resumed_run_keeps_the_best_checkpoint_unless_an_evaluation_beats_it(tmp_path, monkeypatch):
    """The best evaluation was not in the checkpoint: after --resume the first evaluation, however bad,
    replaced best.pt."""
    import metaopt.trainer as trainer_module

    scores = iter([1.0, 0.5, 0.8, 0.9, 0.7, 0.6, 0.4])  # mse at iterations 1..4, then 5..7 after the resume

    def scripted(learner, sampler, tasks, **kwargs):
        return {"mse": next(scores), "ci95": 0.0, "tasks": tasks}

    monkeypatch.setattr(trainer_module, "evaluate", scripted)
    config = dict(eval_every=1, eval_tasks=2, keep_best="mse", checkpoint_every=2)
    Trainer(_config(iterations=4, **config), tmp_path).train(progress=False)
    assert load_safe(tmp_path / "best.pt")["iteration"] == 2
    resumed = Trainer(_config(iterations=6, **config), tmp_path, resume=True)
    assert resumed.best_eval["iteration"] == 2 and resumed.best_eval["mse"] == 0.5
    resumed.train(progress=False)  # 0.7 and 0.6 do not beat 0.5
    assert load_safe(tmp_path / "best.pt")["iteration"] == 2
    Trainer(_config(iterations=7, **config), tmp_path, resume=True).train(progress=False)  # 0.4 does
    assert load_safe(tmp_path / "best.pt")["iteration"] == 7
    best = trainer_module.best_logged_eval(tmp_path, 6, _config(**config))  # checkpoints without best_eval
    assert best["iteration"] == 2 and best["mse"] == 0.5
