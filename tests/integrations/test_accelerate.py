"""accelerate: bf16 autocast through the inner and outer loop, fp16 refused, CLI precision."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import OUTSIDE, regression_tasks

from metaopt import MetaLearner, hookimpl
from metaopt.errors import ConfigError
from metaopt.integrations.accelerate import make_accelerator, prepare
from metaopt.models import mlp


class DtypeProbe:
    name = "dtype_probe"

    def __init__(self):
        self.seen: set[tuple[str, torch.dtype]] = set()

    @hookimpl(wrapper=True)
    def inner_loss(self, task, params):
        self.seen.add(("support_output", task.forward(task.support_x, params).dtype))
        return (yield)

    @hookimpl(wrapper=True)
    def outer_loss(self, task, params):
        loss = yield
        self.seen.add(("query_output", task.query_output.dtype))
        return loss


def test_bf16_autocast_reaches_inner_and_query_forwards_and_grads_stay_fp32():
    probe = DtypeProbe()
    learner = MetaLearner(mlp(), [probe], inner_steps=2, inner_lr=0.01, loss_fn=F.mse_loss)
    learner = prepare(learner, make_accelerator("bf16", cpu=True))
    result = learner.backward(regression_tasks(2, dtype=torch.float32))
    assert probe.seen == {("support_output", torch.bfloat16), ("query_output", torch.bfloat16)}
    assert result.loss.dtype == torch.float32
    grads = [p.grad for p in learner.meta_parameters()]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert max(float(g.abs().max()) for g in grads) > 0


def test_fp16_is_refused_naming_bf16():
    with pytest.raises(ConfigError, match="bf16"):
        make_accelerator("fp16", cpu=True)


def test_accumulating_micro_batches_is_refused_for_outer_sam():
    """Outer SAM perturbs along the whole batch's meta-gradient; accumulated micro-batches would each perturb
    along their own. Plain MAML accumulates exactly (accelerate divides each micro-batch's loss)."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    learner = MetaLearner(mlp(), ["sharp_maml:rho_outer=0.05"], loss_fn=F.mse_loss)
    with pytest.raises(ConfigError, match=r"gradient_accumulation_steps=2 with 'sharp_maml', which replaces the outer"):
        prepare(learner, accelerator)
    torch.manual_seed(0)
    whole = MetaLearner(mlp().double(), ["sharp_maml:rho_inner=0.05"], loss_fn=F.mse_loss)  # inner SAM: per task
    torch.manual_seed(0)
    micro = prepare(MetaLearner(mlp().double(), ["sharp_maml:rho_inner=0.05"], loss_fn=F.mse_loss), accelerator)
    tasks = regression_tasks(4)
    whole.backward(tasks)
    for part in (tasks[:2], tasks[2:]):
        with accelerator.accumulate(micro):
            micro.backward(part)
    for a, b in zip(whole.parameters(), micro.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-12, atol=1e-14)


def _train_eval(tmp_path, precision: str) -> float:
    out = tmp_path / precision
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    train = [sys.executable, "-m", "metaopt.cli", "train", "--data", "sinusoid", "--shots", "10", "--query", "10"]
    train += ["--inner-lr", "0.01", "--meta-batch", "10", "--iterations", "300", "--checkpoint-every", "0"]
    train += ["--precision", precision, "--device", "cpu", "--no-progress", "--out", str(out)]
    subprocess.run(train, check=True, capture_output=True, env=env, cwd=OUTSIDE)
    ev = [sys.executable, "-m", "metaopt.cli", "eval", str(out), "--tasks", "300", "--json"]
    return json.loads(subprocess.run(ev, check=True, capture_output=True, text=True, env=env, cwd=OUTSIDE).stdout)[
        "mse"
    ]


@pytest.mark.slow
def test_bf16_training_matches_fp32_sinusoid_mse_within_ten_percent(tmp_path):
    fp32, bf16 = _train_eval(tmp_path, "no"), _train_eval(tmp_path, "bf16")
    assert fp32 != bf16  # bf16 really ran (different rounding)
    assert abs(bf16 - fp32) <= 0.10 * fp32, (fp32, bf16)


def test_save_state_and_load_state_restore_the_learner_and_sampler(tmp_path):
    from accelerate import Accelerator

    from metaopt.data import SinusoidTasks
    from metaopt.integrations.accelerate import register_for_checkpointing
    from metaopt.plugins import MAMLPlusPlus

    accelerator = Accelerator(cpu=True)
    learner = prepare(MetaLearner(mlp(), [MAMLPlusPlus()], inner_steps=2, loss_fn=F.mse_loss), accelerator)
    sampler = SinusoidTasks(shots=5, seed=0)
    optimizer = accelerator.prepare(torch.optim.Adam(learner.parameters(), 1e-2))
    register_for_checkpointing(accelerator, learner, sampler)

    def step():
        optimizer.zero_grad()
        learner.backward(sampler.sample(2))
        optimizer.step()

    step()
    accelerator.save_state(str(tmp_path / "state"))
    saved = {k: v.clone() for k, v in learner.state_dict().items()}
    plugin_state = learner.plugin_state()
    next_tasks = sampler.sample(1)[0]  # what the sampler draws next after the saved point
    step()
    step()
    accelerator.load_state(str(tmp_path / "state"))
    assert all(torch.equal(saved[k], v) for k, v in learner.state_dict().items())  # the learned rates too
    assert learner.plugin_state() == plugin_state and learner.iteration == 1
    assert all(torch.equal(a, b) for a, b in zip(sampler.sample(1)[0], next_tasks))


def test_a_learner_on_a_ddp_wrapped_model_says_what_to_do(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        wrapped = torch.nn.parallel.DistributedDataParallel(mlp())
        with pytest.raises(ConfigError, match=r"wrapped in DistributedDataParallel.*unwrap_model"):
            MetaLearner(wrapped)
    finally:
        dist.destroy_process_group()
