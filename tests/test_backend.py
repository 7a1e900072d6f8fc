"""The two backends (higher, torch.func) give the same meta-gradients, for MAML and every plugin."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import image_tasks, regression_tasks
from reference import maml_meta_grad

from metaopt import MetaLearner, hookimpl
from metaopt.errors import ConfigError
from metaopt.models import conv4, mlp
from metaopt.registry import create_plugin

BACKENDS = ["higher", "torch.func"]


def _grads(learner):
    return {n: p.grad.detach().clone() for n, p in learner.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv4_second_order_matches_reference_and_leaves_bn_and_modes(backend):
    torch.manual_seed(0)
    model = conv4(num_classes=5, hidden=8).double()
    model.eval()  # the user's mode must be restored after the batch
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    learner = MetaLearner(model, inner_steps=2, inner_lr=0.4, backend=backend)
    learner.backward(image_tasks(2))
    model_grads = {n: p.grad for n, p in model.named_parameters()}
    model.train()
    ref = maml_meta_grad(model, image_tasks(2), 2, 0.4, F.cross_entropy)
    assert max((model_grads[n] - ref[n]).abs().max().item() for n in ref) < 1e-8
    assert all(torch.equal(buffers[n], b) for n, b in model.named_buffers())
    model.eval()
    learner.evaluate(image_tasks(1))
    assert not any(m.training for m in model.modules())


PLUGINS = {
    "maml": [],
    "fomaml": [("fomaml", {})],
    "reptile": [("reptile", {})],
    "convergent_fo": [("convergent_fo", {})],
    "shot": [("shot", {})],
    "sharp_both": [("sharp_maml", {"rho_inner": 0.05, "rho_outer": 0.05})],
    "hypermaml": [("hypermaml", {"hidden": 16, "warmup_iters": 1, "blend_iters": 1})],
}


@pytest.mark.parametrize("name", list(PLUGINS))
def test_backends_agree_for_every_plugin(name):
    results = []
    for backend in BACKENDS:
        torch.manual_seed(0)
        plugins = [create_plugin(p, **o) for p, o in PLUGINS[name]]
        learner = MetaLearner(
            mlp().double(), plugins, inner_steps=2, inner_lr=0.05, loss_fn=F.mse_loss, backend=backend
        )
        learner.double()
        grads = []
        for step in range(3):  # 3 steps so HyperMAML passes warm-up, blend and pure phases
            learner.zero_grad(set_to_none=True)
            learner.backward(regression_tasks(2, seed=step))
            grads.append(_grads(learner))
        results.append(grads)
    for a, b in zip(*results):
        assert a.keys() == b.keys()
        assert max((a[n] - b[n]).abs().max().item() for n in a) < 1e-10


class TiedWeights(torch.nn.Module):
    """Two Linear layers sharing one weight Parameter (as tied embeddings do)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(1, 1)
        self.b = torch.nn.Linear(1, 1)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def test_tied_weights_see_the_fast_weight_in_both_places():
    results = []
    for backend in BACKENDS:
        torch.manual_seed(0)
        model = TiedWeights().double()
        learner = MetaLearner(model, inner_steps=2, inner_lr=0.3, loss_fn=F.mse_loss, backend=backend)
        learner.backward(regression_tasks(2))
        results.append({n: p.grad.clone() for n, p in model.named_parameters()})
    torch.manual_seed(0)
    model = TiedWeights().double()
    ref = maml_meta_grad(model, regression_tasks(2), 2, 0.3, F.mse_loss)
    for grads in results:
        assert grads.keys() == ref.keys() == {"a.weight", "a.bias", "b.bias"}
        assert max((grads[n] - ref[n]).abs().max().item() for n in ref) < 1e-10


def test_unknown_backend_is_named():
    with pytest.raises(ConfigError, match="'torchfunc'.*'torch.func'"):
        MetaLearner(mlp(), backend="torchfunc")


class ReadsAChildsWeight(torch.nn.Module):
    """Normalisation written functionally with a child module's parameters, which is never called
    (``order="read"``), or read before the child is called (``order="before"``)."""

    def __init__(self, order: str = "read") -> None:
        super().__init__()
        self.order = order
        self.linear, self.head = torch.nn.Linear(1, 8), torch.nn.Linear(8, 1)
        self.norm = torch.nn.LayerNorm(8) if order == "read" else None

    def forward(self, x):
        h = self.linear(x)
        if self.order == "read":
            h = F.layer_norm(h, (8,), self.norm.weight, self.norm.bias)
        else:
            scale = self.head.bias  # read before self.head runs: higher hands the previous call's value
            h = F.layer_norm(h, (8,), None, None) * scale
        return self.head(torch.tanh(h))


@pytest.mark.parametrize("order", ["read", "before"])
def test_higher_is_refused_for_a_forward_that_reads_a_childs_parameter(order):
    """higher swaps a module's parameters only when that module runs: such a forward would adapt with
    the original values of those parameters, silently.  Refused on the first batch, naming them, with
    nothing changed; the torch.func backend runs it and equals the float64 reference."""
    torch.manual_seed(0)
    model = ReadsAChildsWeight(order).double()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    learner = MetaLearner(model, inner_steps=2, inner_lr=0.3, loss_fn=F.mse_loss)
    name = "norm.weight" if order == "read" else "head.bias"
    with pytest.raises(ConfigError, match=rf"{name}.*backend='torch.func'"):
        learner.backward(regression_tasks(2))
    assert all(p.grad is None and torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert model.training
    fresh = MetaLearner(model, inner_steps=2, inner_lr=0.3, loss_fn=F.mse_loss)  # used only through predict
    with pytest.raises(ConfigError, match=rf"{name}.*backend='torch.func'"):
        fresh.predict(regression_tasks(1)[0])
    learner = MetaLearner(model, inner_steps=2, inner_lr=0.3, loss_fn=F.mse_loss, backend="torch.func")
    learner.backward(regression_tasks(2))
    torch.manual_seed(0)
    ref = maml_meta_grad(ReadsAChildsWeight(order).double(), regression_tasks(2), 2, 0.3, F.mse_loss)
    assert max((p.grad - ref[n]).abs().max().item() for n, p in model.named_parameters() if n in ref) < 1e-10


def test_higher_is_refused_for_hook_based_weight_norm():
    """torch.nn.utils.weight_norm (the deprecated hook-based one) computes ``weight`` in a forward
    pre-hook, which higher's copy runs on the original ``weight_g`` / ``weight_v``: refused; the
    torch.func backend equals the float64 reference (the parametrization-based one runs under both)."""

    def make(legacy: bool) -> torch.nn.Module:
        torch.manual_seed(0)
        layer = torch.nn.Linear(1, 16)
        layer = torch.nn.utils.weight_norm(layer) if legacy else torch.nn.utils.parametrizations.weight_norm(layer)
        return torch.nn.Sequential(layer, torch.nn.Tanh(), torch.nn.Linear(16, 1)).double()

    with pytest.warns(FutureWarning):
        legacy = make(True)
    with pytest.raises(ConfigError, match=r"0.weight_g.*weight_norm"):
        MetaLearner(legacy, inner_steps=2, inner_lr=0.3, loss_fn=F.mse_loss).backward(regression_tasks(2))
    for legacy, backend in [(True, "torch.func"), (False, "higher"), (False, "torch.func")]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            model = make(legacy)
            ref = maml_meta_grad(make(legacy), regression_tasks(2), 2, 0.3, F.mse_loss)
        MetaLearner(model, inner_steps=2, inner_lr=0.3, loss_fn=F.mse_loss, backend=backend).backward(
            regression_tasks(2)
        )
        assert max((p.grad - ref[n]).abs().max().item() for n, p in model.named_parameters()) < 1e-10


class DrawsAndCounts(torch.nn.Module):
    """Noise in every forward (eval mode included) and a buffer counting calls: no stale read."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(1, 8), torch.nn.Linear(8, 1)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        h = torch.tanh(self.a(x)) * (1 + self.calls / 1e3) + 0.1 * torch.randn(x.shape[0], 8, dtype=x.dtype)
        return self.b(h)


def test_the_stale_read_check_compares_forwards_from_the_same_random_state_and_buffers():
    torch.manual_seed(0)
    model = DrawsAndCounts().double()
    learner = MetaLearner(model, inner_steps=1, inner_lr=0.3, loss_fn=F.mse_loss)
    cudnn = torch.backends.cudnn
    saved = cudnn.benchmark
    cudnn.benchmark = True
    try:
        assert learner.backend.stale_reads(regression_tasks(1)[0][0], learner.adapted_names) == []
        assert cudnn.benchmark and not cudnn.deterministic  # exact kernels only during the check
    finally:
        cudnn.benchmark = saved
    assert float(model.calls) == 0  # the check's forwards leave the buffers as they were
    learner.backward(regression_tasks(2))


class ReadsAndReturnsADict(ReadsAChildsWeight):
    def forward(self, x):
        return {"logits": super().forward(x), "step": torch.ones((), dtype=torch.long)}


def test_the_stale_read_check_reads_dict_outputs():
    torch.manual_seed(0)
    model = ReadsAndReturnsADict("read").double()
    learner = MetaLearner(model, inner_steps=1, inner_lr=0.3, loss_fn=lambda out, y: F.mse_loss(out["logits"], y))
    assert learner.backend.stale_reads(regression_tasks(1)[0][0], learner.adapted_names) == [
        "norm.weight",
        "norm.bias",
    ]
    with pytest.raises(ConfigError, match="norm.weight"):
        learner.backward(regression_tasks(2))


class DropNorm(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Linear(1, 8)
        self.drop = torch.nn.Dropout(0.0)
        self.norm = torch.nn.BatchNorm1d(8)
        self.head = torch.nn.Linear(8, 1)
        self.freeze = False

    def forward(self, x):
        return self.head(self.norm(self.drop(self.body(x))))


class FreezableDropout(DropNorm):
    """Its own ``train()`` keeps dropout off while ``freeze`` is set (decided by more than the flags)."""

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze:
            self.drop.eval()
        return self


class ModesSeen:
    """Records the model's train/eval flags (drop, norm) while a task runs."""

    name = "modes_seen"
    vmap_safe = True

    def __init__(self, model):
        self.model, self.seen = model, []

    @hookimpl
    def task_start(self, task):
        self.seen.append((self.model.drop.training, self.model.norm.training))


@pytest.mark.parametrize("engine", ["loop", "vmap"])
@pytest.mark.parametrize("model_class", [DropNorm, FreezableDropout])
def test_modes_during_a_batch_follow_the_model_every_batch(engine, model_class):
    """Training batches run in train mode, evaluation batches with dropout off (BatchNorm transductive);
    the user's modes come back after each, a mode the user changes between batches is seen, and a
    model's own train() is called again when it decides by more than the flags."""
    torch.manual_seed(0)
    model = model_class().double()
    recorder = ModesSeen(model)
    learner = MetaLearner(model, [recorder], loss_fn=F.mse_loss, engine=engine, backend="torch.func")
    tasks = regression_tasks(2)
    model.eval()
    for run in (learner.backward, learner.evaluate, learner.backward):
        run(tasks)
        assert not any(m.training for m in model.modules())  # the user's eval mode, restored every time
    model.train()
    learner.backward(tasks)
    assert all(m.training for m in model.modules())
    per_task = len(recorder.seen) // 4
    assert recorder.seen[::per_task] == [(True, True), (False, True), (True, True), (True, True)]
    model.freeze = True
    recorder.seen.clear()
    learner.backward(tasks)
    assert recorder.seen[0] == ((False, True) if model_class is FreezableDropout else (True, True))


class Tangled(torch.nn.Module):
    """A module under two names, a weight tied into a second module, a missing bias, a buffer shared
    by two norms and a non-persistent buffer: every case in which torch's walks drop a duplicate."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(3, 3, bias=False)
        self.b = self.a
        self.c = torch.nn.Linear(3, 3)
        self.c.weight = self.a.weight
        self.norm = torch.nn.BatchNorm1d(3)
        self.other = torch.nn.BatchNorm1d(3)
        self.other.running_mean = self.norm.running_mean
        self.register_buffer("scratch", torch.zeros(1), persistent=False)


def test_one_walk_reads_what_torchs_three_walks_read():
    from metaopt.backend import walk_module

    model = Tangled()
    modules, params, buffers = walk_module(model)
    assert modules == list(model.modules())
    assert [(n, id(p)) for n, p in params.items()] == [(n, id(p)) for n, p in model.named_parameters()]
    assert [(n, id(b)) for n, b in buffers.items()] == [(n, id(b)) for n, b in model.named_buffers()]
    assert "c.weight" not in params and "other.running_mean" not in buffers and "scratch" in buffers


@pytest.mark.parametrize("engine", ["loop", "vmap"])
def test_a_module_replaced_between_batches_is_adapted_and_trained(engine):
    """The backend reads the model's parameters every batch: a new head is what the next batch adapts."""
    torch.manual_seed(0)
    model = mlp().double()
    learner = MetaLearner(model, loss_fn=F.mse_loss, engine=engine, backend="torch.func")
    tasks = regression_tasks(2)
    learner.backward(tasks)
    learner.zero_grad()
    old = model.head
    model.head = torch.nn.Linear(old.in_features, old.out_features).double()
    learner.backward(tasks)
    assert model.head.weight.grad is not None and old.weight.grad is None
