"""metaopt.norms: the norm routing of the vmap engine, whichever way a model spells the call."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F
from conftest import regression_tasks
from torch import layer_norm as bound_torch_layer_norm  # bound before any routing: only the mode sees it
from torch import nn
from torch.nn.functional import layer_norm as bound_f_layer_norm

from metaopt import MetaLearner
from metaopt.norms import SafeNorms, SafeNormsMode, routing

SPELLINGS = ("F.layer_norm", "torch.layer_norm", "bound F.layer_norm", "bound torch.layer_norm", "nn.LayerNorm")


class Spelled(nn.Module):
    """A LayerNorm MLP whose norm call is spelled one of :data:`SPELLINGS`."""

    def __init__(self, spelling: str) -> None:
        super().__init__()
        self.spelling = spelling
        self.linear = nn.Linear(1, 8)
        self.weight = nn.Parameter(1 + 0.3 * torch.randn(8))
        self.bias = nn.Parameter(0.3 * torch.randn(8))
        self.norm = nn.LayerNorm(8) if spelling == "nn.LayerNorm" else None
        self.head = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w, b = self.linear(x), self.weight, self.bias
        if self.spelling == "F.layer_norm":
            h = F.layer_norm(h, (8,), w, b)
        elif self.spelling == "torch.layer_norm":
            h = torch.layer_norm(h, (8,), w, b)
        elif self.spelling == "bound F.layer_norm":
            h = bound_f_layer_norm(h, (8,), w, b)
        elif self.spelling == "bound torch.layer_norm":
            h = bound_torch_layer_norm(h, (8,), w, b)
        else:
            h = self.norm(h) * w + b
        return self.head(torch.tanh(h))


def _gradients(spelling: str, engine: str, safe: bool = True) -> tuple[list[torch.Tensor], MetaLearner]:
    """The meta-gradient of three batches in a row (the first one is the vmap engine's audit batch)."""
    torch.manual_seed(0)
    learner = MetaLearner(Spelled(spelling).double(), inner_steps=2, inner_lr=0.3, loss_fn=F.mse_loss, engine=engine)
    grads = []
    for seed in range(3):
        if not safe and seed == 1:
            learner.engines["vmap"].safe_norms = False
        for p in learner.meta_parameters():
            p.grad = None
        learner.backward(regression_tasks(3, seed=seed))
        grads.append(torch.cat([p.grad.flatten() for p in learner.meta_parameters()]))
    return grads, learner


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_every_spelling_is_exact_on_every_batch(spelling):
    """float64, K=2: each of three batches under vmap equals the loop to 1e-10; a norm function bound
    before the routing (``from torch import layer_norm``) keeps the mode on after the first batch."""
    loop, _ = _gradients(spelling, "loop")
    vmap, learner = _gradients(spelling, "vmap")
    for i, (a, b) in enumerate(zip(vmap, loop, strict=True)):
        assert b.norm() > 0 and _relative(a, b) < 1e-10, (spelling, i)
    assert learner.engines["vmap"].norms_mode[True] is (spelling == "bound torch.layer_norm")


@pytest.mark.parametrize("spelling", ["torch.layer_norm", "bound torch.layer_norm"])
def test_without_the_routing_these_spellings_are_wrong(spelling):
    """The check above can fail: with the routing off, the same batches are more than 1e-4 off."""
    loop, _ = _gradients(spelling, "loop")
    raw, _ = _gradients(spelling, "vmap", safe=False)
    assert _relative(raw[1], loop[1]) > 1e-4


def test_routing_is_per_thread_and_undone():
    """Another thread keeps torch's kernels (its BatchNorm still updates running statistics) while one
    thread is inside SafeNorms, and the torch attributes are the originals again afterwards."""
    original = torch.batch_norm
    x = torch.randn(16, 3) + 5.0
    here, there = nn.BatchNorm1d(3), nn.BatchNorm1d(3)
    seen: dict[str, bool] = {}

    def other_thread() -> None:
        seen["routing"] = routing()
        there(x)

    with SafeNorms():
        assert routing() and torch.batch_norm is not original
        here(x)  # the decomposition: running statistics are not written
        worker = threading.Thread(target=other_thread)
        worker.start()
        worker.join()
    assert not routing() and torch.batch_norm is original
    assert seen["routing"] is False
    assert torch.equal(here.running_mean, torch.zeros(3))
    assert there.running_mean.min() > 0.4  # torch's kernel: momentum 0.1 towards a mean of about 5


def test_the_mode_records_a_bound_call_only_when_auditing():
    h, w = torch.randn(4, 8), torch.ones(8)
    for audit in (True, False):
        with SafeNormsMode(audit=audit) as mode:
            bound_torch_layer_norm(h, (8,), w, None)
        assert mode.bound is audit
        with SafeNormsMode(audit=True) as mode:
            F.layer_norm(h, (8,), w, None)
        assert mode.bound is False


def test_the_last_thread_to_leave_restores_the_originals():
    """Two threads inside at once: the first to leave keeps the routing for the other."""
    original = torch.layer_norm
    inside, first_left, done = threading.Event(), threading.Event(), threading.Event()
    seen: dict[str, bool] = {}

    def second() -> None:
        with SafeNorms():
            inside.set()
            first_left.wait(10)
            seen["still routed"] = routing() and torch.layer_norm is not original
        done.set()

    worker = threading.Thread(target=second)
    with SafeNorms():
        worker.start()
        assert inside.wait(10)
    first_left.set()
    assert done.wait(10)
    worker.join()
    assert seen["still routed"] and torch.layer_norm is original and not routing()


def test_another_librarys_wrapper_is_kept_for_other_threads_and_put_back(monkeypatch):
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(1)
        return bound_torch_layer_norm(*args, **kwargs)

    monkeypatch.setattr(torch, "layer_norm", wrapper)
    h = torch.randn(4, 8)
    with SafeNorms():
        worker = threading.Thread(target=lambda: torch.layer_norm(h, (8,)))
        worker.start()
        worker.join()
        torch.layer_norm(h, (8,))  # this thread: the decomposition, not the wrapper
    assert calls == [1] and torch.layer_norm is wrapper
