"""memory="recompute": the same second-order meta-gradient as the default, one inner step's graph at a time.

Float64: recompute against the default (keep) to 1e-10 relative, and against central differences
of the meta-objective; MLP and conv+BN, K = 1, 3, 10, inner SGD and ExactAdam, every replay-safe
built-in plugin and SHOT + Sharp-MAML, on the loop and the vmap engine; dropout replays exactly;
refusals are named when the learner is built.  Memory and time against K: benchmarks/memory.py (docs/benchmarks/memory.md).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_meta_gradient_matches_central_differences, regression_tasks
from test_engine import conv_bn, image_tasks, seeded_mlp
from torch import nn

from metaopt import ConfigError, MetaLearner, hookimpl
from metaopt.plugins import ANIL, FOMAML, SHOT, MAMLPlusPlus, MetaSGD, ProtoHead, SharpMAML

MODELS = {
    "mlp": (seeded_mlp, lambda: regression_tasks(3), F.mse_loss),
    "conv_bn": (conv_bn, lambda: image_tasks(3), F.cross_entropy),
}
PLUGINS = {
    "maml": list,
    "shot": lambda: [SHOT(weight=0.5)],
    "sharp_inner": lambda: [SharpMAML(rho_inner=0.05)],
    "sharp_outer": lambda: [SharpMAML(rho_outer=0.05)],
    "sharp_both": lambda: [SharpMAML(rho_inner=0.05, rho_outer=0.05)],
    "shot+sharp_both": lambda: [SHOT(weight=0.5), SharpMAML(rho_inner=0.05, rho_outer=0.05)],
    "meta_sgd": lambda: [MetaSGD()],
    "maml_pp": lambda: [MAMLPlusPlus(msl_iters=4)],
    "anil": lambda: [ANIL()],
    "proto_head": lambda: [ProtoHead()],
    "fomaml": lambda: [FOMAML()],
}


def meta_gradient(model_name, plugins, memory, steps, **options):
    make_model, make_tasks, loss_fn = MODELS[model_name]
    learner = MetaLearner(
        make_model(), plugins(), inner_steps=steps, inner_lr=0.3, loss_fn=loss_fn, memory=memory, **options
    )
    tasks = make_tasks()
    for _ in range(2):  # two iterations: schedules (MAML++'s multi-step loss) move on
        for p in learner.meta_parameters():
            p.grad = None
        result = learner.backward(tasks)
    grads = torch.cat(
        [(torch.zeros_like(p) if p.grad is None else p.grad).flatten() for p in learner.meta_parameters()]
    )
    return grads, result, learner


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


ENGINES = ["loop", "vmap"]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("steps", [1, 3, 10])
@pytest.mark.parametrize("model_name", list(MODELS))
def test_recompute_equals_the_default(model_name, steps, optimizer, engine):
    keep, keep_result, _ = meta_gradient(model_name, list, "keep", steps, inner_optimizer=optimizer)
    recompute, result, learner = meta_gradient(
        model_name, list, "recompute", steps, inner_optimizer=optimizer, engine=engine
    )
    assert learner.last_engine == engine
    assert keep.norm() > 0 and relative(recompute, keep) <= 1e-10
    assert result.metrics == pytest.approx(keep_result.metrics, rel=1e-12)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("plugin", [p for p in PLUGINS if p != "maml"])
@pytest.mark.parametrize("model_name", list(MODELS))
def test_recompute_equals_the_default_with_each_plugin(model_name, plugin, engine):
    if plugin == "proto_head" and model_name == "mlp":
        pytest.skip("proto_head needs a classifier head (class-index labels)")
    keep, _, _ = meta_gradient(model_name, PLUGINS[plugin], "keep", 3)
    recompute, _, learner = meta_gradient(model_name, PLUGINS[plugin], "recompute", 3, engine=engine)
    assert learner.last_engine == engine
    assert keep.norm() > 0 and relative(recompute, keep) <= 1e-10


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("model_name", list(MODELS))
def test_recompute_equals_central_differences(model_name, optimizer, engine):
    """Independent of both memory modes: central differences of the meta-objective, float64, K=3."""
    make_model, make_tasks, loss_fn = MODELS[model_name]
    tasks = make_tasks()
    options = dict(inner_steps=3, inner_lr=0.3, loss_fn=loss_fn, inner_optimizer=optimizer)
    learner = MetaLearner(make_model(), memory="recompute", engine=engine, **options)
    learner.backward(tasks)
    grad = torch.cat([p.grad.flatten() for p in learner.model.parameters()])
    # inner Adam makes the objective sharply curved: the plain central difference's error is 1.6e-4 at
    # h=1e-6 and shrinks 100x per 10x smaller h, hence Richardson extrapolation
    assert_meta_gradient_matches_central_differences(MetaLearner(make_model(), **options), tasks, grad, seed=5)


class DropoutMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(1, 32), nn.Tanh(), nn.Dropout(0.3), nn.Linear(32, 32), nn.Tanh())
        self.head = nn.Linear(32, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


@pytest.mark.parametrize("engine", ENGINES)
def test_dropout_inside_a_step_replays_exactly(engine):
    """The recomputed step draws the same dropout masks (the random state is saved per step)."""
    grads = {}
    for memory in ("keep", "recompute"):
        model = DropoutMLP().double()
        learner = MetaLearner(model, inner_steps=3, inner_lr=0.3, loss_fn=F.mse_loss, memory=memory, engine=engine)
        torch.manual_seed(123)
        learner.backward(regression_tasks(2))
        grads[memory] = torch.cat([p.grad.flatten() for p in model.parameters()])
        after = torch.rand(1)  # the random state moves on the same way in both modes
        grads[memory + "/after"] = after
    assert relative(grads["recompute"], grads["keep"]) <= 1e-10
    assert torch.equal(grads["recompute/after"], grads["keep/after"])


class Unsure:
    name = "unsure"

    @hookimpl
    def inner_step(self, task, trajectory, params, grads):
        return {n: p - 0.1 * grads[n] for n, p in params.items()}


class Sure(Unsure):
    name = "sure"

    @hookimpl
    def replay_safe(self, learner):
        return True


def test_refusals_are_named_when_the_learner_is_built():
    with pytest.raises(ConfigError, match=r"plugin 'unsure' implements \['inner_step'\].*does not declare replay_safe"):
        MetaLearner(seeded_mlp(), [Unsure()], loss_fn=F.mse_loss, memory="recompute")
    MetaLearner(seeded_mlp(), [Sure()], loss_fn=F.mse_loss, memory="recompute")
    with pytest.raises(ConfigError, match=r"plugin 'hypermaml'.*replaces the inner loop"):
        MetaLearner(seeded_mlp(), ["hypermaml"], loss_fn=F.mse_loss, memory="recompute")
    with pytest.raises(ConfigError, match=r"inner_optimizer='rmsprop'.*higher's optimizer"):
        MetaLearner(seeded_mlp(), loss_fn=F.mse_loss, memory="recompute", inner_optimizer="rmsprop")
    auto = MetaLearner(seeded_mlp(), loss_fn=F.mse_loss, memory="recompute", engine="auto")
    assert auto.engine_for(regression_tasks(2)) == "vmap"  # recompute runs on both engines
    with pytest.raises(ConfigError, match=r"memory='recompue' is not known.*'recompute'"):
        MetaLearner(seeded_mlp(), loss_fn=F.mse_loss, memory="recompue")


class KeepWeakRefs:
    """Records a weak reference to every task's last inner iterate."""

    name = "keep_weakrefs"

    def __init__(self) -> None:
        self.refs: list = []

    @hookimpl
    def task_end(self, task):
        import weakref

        self.refs += [weakref.ref(t) for t in task.trajectory.iterates[-1].values()]


def test_each_steps_saved_inputs_are_freed_by_the_backward_without_the_garbage_collector():
    """A step's node kept a closure that reached the trajectory, whose iterates reach the node: a cycle
    that only the cyclic garbage collector freed, so memory grew by every step's inputs per iteration."""
    import gc

    watcher = KeepWeakRefs()
    learner = MetaLearner(seeded_mlp(), [watcher], inner_steps=5, inner_lr=0.3, loss_fn=F.mse_loss, memory="recompute")
    gc.collect()
    gc.disable()
    try:
        learner.backward(regression_tasks(2))
        assert watcher.refs and all(ref() is None for ref in watcher.refs)
    finally:
        gc.enable()


class AutocastSpy:
    """Records, for every support loss, whether it ran in a replay and under autocast."""

    name = "autocast_spy"

    def __init__(self) -> None:
        self.seen: list[tuple[bool, bool]] = []

    @hookimpl
    def replay_safe(self, learner):
        return True

    @hookimpl(wrapper=True)
    def inner_loss(self, task, params):
        loss = yield
        self.seen.append((task.replaying, torch.is_autocast_enabled("cpu")))
        return loss


@pytest.mark.parametrize("engine", ENGINES)
def test_the_replay_runs_under_the_autocast_its_step_ran_under(engine):
    """A user's forward under torch.autocast with the backward outside it (as torch.amp advises): the
    outer backward's replay enters autocast again, so the recomputed step is the step that ran."""
    spy = AutocastSpy()
    model = conv_bn().float()
    learner = MetaLearner(
        model, [spy], inner_steps=2, inner_lr=0.3, loss_fn=F.cross_entropy, memory="recompute", engine=engine
    )
    tasks = [tuple(t.float() if t.is_floating_point() else t for t in task) for task in image_tasks(2)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = learner.forward(tasks)
    result.loss.backward()
    replays = [autocast for replaying, autocast in spy.seen if replaying]
    firsts = [autocast for replaying, autocast in spy.seen if not replaying]
    assert replays and firsts and all(replays) and all(firsts)


class RecordFinal:
    name = "record_final"

    def __init__(self) -> None:
        self.values: list[dict] = []
        self.tasks: list = []

    @hookimpl
    def task_end(self, task):
        self.values.append({n: p.detach().clone() for n, p in task.trajectory.iterates[-1].items()})

    @hookimpl
    def batch_end(self, batch):
        self.tasks = list(batch.tasks)


def test_a_task_is_cut_from_its_spent_graph_after_its_backward_with_the_same_values():
    """Loop engine, recompute: each step's node (saved random state, closure) stayed reachable from the
    task's record until the batch ended, growing memory with K; after the task's own backward the record
    keeps its values without the graph."""
    recorder = RecordFinal()
    learner = MetaLearner(seeded_mlp(), [recorder], inner_steps=4, inner_lr=0.3, loss_fn=F.mse_loss, memory="recompute")
    learner.backward(regression_tasks(3))
    assert len(recorder.tasks) == 3
    for task, values in zip(recorder.tasks, recorder.values, strict=True):
        assert task.loss.grad_fn is None and all(p.grad_fn is None for p in task.params.values())
        assert all(p.grad_fn is None for step in task.trajectory.iterates[1:] for p in step.values())
        assert len(task.trajectory.iterates) == 5
        assert all(torch.equal(task.trajectory.iterates[-1][n], v) for n, v in values.items())
