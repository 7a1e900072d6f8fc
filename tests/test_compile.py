"""engine="compile": the vmap engine's chunk under torch.compile, trusted after an exactness gate.

Float64: every built-in plugin that runs under vmap gives the loop engine's meta-gradient to 1e-10
under compile (the plugin matrix compiles with "aot_eager" — dynamo and AOT autograd, the tracing
that could change what is computed — and two cases with inductor, which also reorders arithmetic);
no recompilation after warm-up; the gate refuses a compiled gradient that is off and names the
parameter; the CLI reports the compilation and the gate.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_meta_gradient_matches_central_differences, regression_tasks
from test_engine import conv_bn, image_tasks, seeded_mlp
from torch import nn

import metaopt.engines.compile as compile_engine
import metaopt.engines.gate as gate_module
from metaopt import ConfigError, MetaLearner
from metaopt.hookspecs import hookimpl
from metaopt.models import HeadedModel, mlp

PLUGINS = {
    "maml": [],
    "fomaml": ["fomaml"],
    "reptile": ["reptile"],
    "shot": ["shot:weight=0.5"],
    "sharp_inner": ["sharp_maml:rho_inner=0.05"],
    "sharp_outer": ["sharp_maml:rho_outer=0.05"],
    "shot+sharp_both": ["shot:weight=0.5", "sharp_maml:rho_inner=0.05,rho_outer=0.05"],
    "meta_sgd": ["meta_sgd"],
    "maml_pp": ["maml_pp:msl_iters=2,first_order_iters=1"],
    "anil": ["anil"],
    "proto_head": ["proto_head"],
    "hypermaml": ["hypermaml"],
}

#: plugins whose task body reads meta-parameters besides the adapted start (their own, or a frozen body)
UNFUSED = {"meta_sgd", "maml_pp", "anil", "hypermaml"}


@pytest.fixture
def aot_eager(monkeypatch):
    monkeypatch.setattr(compile_engine, "COMPILE_BACKEND", "aot_eager")


def gradient(learner: MetaLearner, tasks) -> torch.Tensor:
    for p in learner.parameters():
        p.grad = None
    learner.backward(tasks)
    return torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).flatten() for p in learner.parameters()])


def train_side_by_side(make_model, plugins, make_tasks, loss_fn, iterations: int, steps: int = 2):
    """The loop and the compile engine from the same start, stepping together; the largest relative
    difference of their meta-gradients, and the compile engine."""
    learners = {}
    for engine in ("loop", "compile"):
        torch.manual_seed(0)
        learners[engine] = MetaLearner(
            make_model(), list(plugins), inner_steps=steps, inner_lr=0.3, loss_fn=loss_fn, engine=engine
        )
    worst = 0.0
    for _ in range(iterations):
        tasks = make_tasks()
        loop, compiled = (gradient(learners[e], tasks) for e in ("loop", "compile"))
        assert loop.norm() > 0
        worst = max(worst, float((compiled - loop).norm() / loop.norm()))
        with torch.no_grad():  # the same plain SGD step on both, so schedules and values move on together
            for a, b in zip(learners["loop"].parameters(), learners["compile"].parameters(), strict=True):
                if a.grad is not None:
                    a -= 0.01 * a.grad
                    b -= 0.01 * b.grad
    return worst, learners["compile"].engines["compile"]


@pytest.mark.slow
@pytest.mark.usefixtures("aot_eager")
@pytest.mark.parametrize("plugin", list(PLUGINS))
def test_every_built_in_plugin_compiles_to_the_loop_engines_gradient_in_float64(plugin):
    worst, engine = train_side_by_side(conv_bn, PLUGINS[plugin], lambda: image_tasks(3), F.cross_entropy, 4)
    assert worst <= 1e-10
    assert engine.gate["passed"] and engine.gate["d_compiled"] <= 1e-10
    # one graph per phase: MAML++'s schedule ends two phases (first order, then the multi-step loss)
    assert engine.recompiles == (2 if plugin == "maml_pp" else 0)
    # one graph for forward and outer backward unless the task body reads meta-parameters of its own
    assert engine.fused == (plugin not in UNFUSED), engine.fused_reason


@pytest.mark.slow
def test_inductor_compiles_second_order_maml_to_the_loop_engines_gradient_in_float64():
    worst, engine = train_side_by_side(conv_bn, [], lambda: image_tasks(3), F.cross_entropy, 3)
    assert worst <= 1e-10 and engine.backend_name == "inductor"
    assert engine.compiles == 1 and engine.recompiles == 0 and engine.compile_seconds > 0


@pytest.mark.slow
def test_inductor_float32_passes_the_gate_calibrated_against_float64():
    torch.manual_seed(0)
    learner = MetaLearner(seeded_mlp().float(), inner_steps=2, inner_lr=0.3, loss_fn=F.mse_loss, engine="compile")
    tasks = [tuple(t.float() for t in task) for task in regression_tasks(4)]
    learner.backward(tasks)
    gate = learner.engines["compile"].gate
    assert gate["passed"] and gate["dtype"] == "float32"
    # float32 rounding, measured: neither exact nor far; the bound comes from the eager result's own distance
    assert 0 < gate["d_eager"] < 1e-5 and 0 < gate["d_compiled"] <= gate["tolerance"]
    assert gate["float64_moves"] < 1e-5  # a smooth meta-gradient: rounding-level inputs move it by about eps


@pytest.mark.slow
@pytest.mark.usefixtures("aot_eager")
def test_convolutional_models_compile_one_task_per_call_unless_task_chunk_says_otherwise():
    """Per task, the compiled graph holds plain convolutions (vmap's are grouped ones); task_chunk
    still decides when given. Both equal the loop engine in float64."""
    tasks = image_tasks(3)
    grads, engines = {}, {}
    for name, engine, chunk in (("loop", "loop", None), ("per task", "compile", None), ("whole", "compile", 3)):
        torch.manual_seed(0)
        learner = MetaLearner(conv_bn(), inner_steps=2, inner_lr=0.3, engine=engine, task_chunk=chunk)
        grads[name] = gradient(learner, tasks)
        engines[name] = (learner.engines.get("compile"), learner.engine_context)
    for name in ("per task", "whole"):
        assert float((grads[name] - grads["loop"]).norm() / grads["loop"].norm()) <= 1e-10
    assert [e.chunk_size(ctx, 3) for e, ctx in (engines["per task"], engines["whole"])] == [1, 3]
    learner = MetaLearner(seeded_mlp(), inner_steps=1, loss_fn=F.mse_loss, engine="compile")
    learner.backward(regression_tasks(3))
    assert learner.engines["compile"].chunk_size(learner.engine_context, 3) == 3  # no convolution: one vmap call


@pytest.mark.usefixtures("aot_eager")
def test_training_and_evaluation_shapes_compile_once_each():
    learner = MetaLearner(seeded_mlp(), inner_steps=2, inner_lr=0.3, loss_fn=F.mse_loss, engine="compile")
    for _ in range(3):
        learner.backward(regression_tasks(3))
        learner.evaluate(regression_tasks(3), steps=2)
    engine = learner.engines["compile"]
    assert engine.compiles == 2 and engine.recompiles == 0


@pytest.mark.usefixtures("aot_eager")
def test_the_gate_refuses_a_compiled_gradient_that_is_off_and_names_the_parameter(caplog):
    learner = MetaLearner(seeded_mlp(), inner_steps=2, inner_lr=0.3, loss_fn=F.mse_loss, engine="compile")
    learner.backward(regression_tasks(3))  # builds the engine; the gate passes
    engine = learner.engines["compile"]
    assert engine.fused  # plain MAML: inner loops and outer backward in one compiled graph
    compiled = engine._compiled_fused

    def off(*args):  # a compiled meta-gradient 1e-6 too large
        grads, loss, metrics = compiled(*args)
        return {n: g * (1 + 1e-6) for n, g in grads.items()}, loss, metrics

    engine._compiled_fused, engine.gate = off, None
    with caplog.at_level(logging.INFO, logger="metaopt.engines"), pytest.raises(ConfigError) as info:
        learner.backward(regression_tasks(3))
    message = str(info.value)
    assert "exactness gate" in message and "engine='vmap'" in message and "'model." in message
    assert "refused" in caplog.text


def test_dropout_inside_a_task_draws_the_eager_engines_numbers_under_inductor_on_cpu():
    """What the gate would refuse if compiled code drew other random numbers: on CPU, inductor's
    compiled task body draws vmap's (same seed, same meta-gradient in float64), and the gate trusts it."""

    def dropout_mlp() -> nn.Module:
        torch.manual_seed(0)
        body = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Dropout(0.5), nn.Linear(40, 40), nn.ReLU())
        return HeadedModel(body, nn.Linear(40, 1)).double()

    grads = {}
    for engine in ("vmap", "compile"):
        learner = MetaLearner(dropout_mlp(), inner_steps=1, inner_lr=0.3, loss_fn=F.mse_loss, engine=engine)
        grads[engine] = []
        for seed in (1, 2):
            torch.manual_seed(seed)
            grads[engine].append(gradient(learner, regression_tasks(3)))
    assert float((grads["vmap"][0] - grads["vmap"][1]).abs().max()) > 0.1  # dropout draws: seeds differ
    for eager, compiled in zip(grads["vmap"], grads["compile"], strict=True):
        assert float((compiled - eager).abs().max() / eager.abs().max()) <= 1e-12
    assert learner.engines["compile"].gate["passed"]


def kinked_learner(dtype: torch.dtype = torch.float64) -> MetaLearner:
    """A sinusoid MLP whose first hidden unit sits exactly at its ReLU kink on the first support point
    of the first task (pre-activation 1 * 1.0 - 1 = 0, exact in float32 and float64), on the compile engine."""
    model = seeded_mlp().to(dtype)
    with torch.no_grad():
        model.body[0].weight[0, 0], model.body[0].bias[0] = 1.0, -1.0
    return MetaLearner(model, inner_steps=1, inner_lr=0.3, loss_fn=F.mse_loss, engine="compile")


def kinked_tasks(dtype: torch.dtype = torch.float64):
    tasks = [tuple(t.to(dtype) for t in task) for task in regression_tasks(3)]
    tasks[0][0][0, 0] = 1.0
    return tasks


def kinked_compiled(compiled, scale_at_kink: float, scale_elsewhere: float = 1.0, in_float64: float | None = None):
    """The engine's ``compiled`` function, with the kinked input one ulp up (ReLU' = 1: the far side) and
    its meta-gradient scaled by ``scale_at_kink`` where the batch is at the kink, else by ``scale_elsewhere``;
    with ``in_float64``, a float64 call (the gate's check of a rough model) is exact but scaled by it."""

    def run(engine, ctx, batch, start, parts, weights):
        x, scale = parts[0], scale_elsewhere
        if in_float64 is not None and x.dtype == torch.float64:
            scale = in_float64
        elif x[0, 0, 0] == 1.0:
            x, scale = x.clone(), scale_at_kink
            x[0, 0, 0] = torch.nextafter(x.new_tensor(1.0), x.new_tensor(2.0))
        grads, loss, metrics = compiled(engine, ctx, batch, start, [x, *parts[1:]], weights)
        return {n: g * scale for n, g in grads.items()}, loss, metrics

    return run


@pytest.mark.usefixtures("aot_eager")
def test_at_a_kink_the_gate_accepts_the_exact_gradient_on_the_far_side():
    """Rounding decides the side of a kink: a compiled result that equals the float64 meta-gradient at
    the batch with its inputs moved by rounding is exact there, and trusted at the batch itself."""
    learner = kinked_learner()
    learner.backward(kinked_tasks())
    engine = learner.engines["compile"]
    assert engine.gate["passed"] and engine.gate["nearest_reference"] == "float64 there"
    assert engine.gate["float64_moves"] > 1e-3  # the exact meta-gradient jumps across the kink
    engine._compiled_fused, engine.gate = kinked_compiled(engine._compiled_fused, 1.0), None
    learner.backward(kinked_tasks())
    gate = engine.gate
    assert gate["passed"] and gate["judged_at"] == "the batch" and gate["places_tried"] == 1
    assert gate["nearest_reference"].startswith("float64 under rounding")
    assert gate["d_compiled"] <= 1e-10 < gate["float64_moves"]  # exact on the far side, far from the batch's


@pytest.mark.usefixtures("aot_eager")
def test_a_batch_on_a_kink_is_judged_at_a_dithered_copy_and_a_wrong_gradient_is_refused_there(monkeypatch, caplog):
    """A result that matches no reference at a kink cannot be judged there: the gate moves to a copy of
    the batch with dithered inputs, off the kink, and judges there, to the full float64 resolution."""
    learner = kinked_learner()
    learner.backward(kinked_tasks())
    engine = learner.engines["compile"]
    compiled = engine._compiled_fused
    # off at the kink only: no reference there is near it, but it is exact wherever float64 is smooth
    engine._compiled_fused, engine.gate = kinked_compiled(compiled, 1 + 1e-6), None
    with caplog.at_level(logging.INFO, logger="metaopt.engines"):
        learner.backward(kinked_tasks())
    gate = engine.gate
    assert gate["passed"] and gate["places_tried"] == 2 and gate["judged_at"].startswith("the batch's inputs x")
    first = gate["places"][0]  # the batch's own numbers are kept: refused, and float64 jumps there
    assert len(gate["places"]) == 2 and first["judged_at"] == "the batch" and first["d_compiled"] > first["tolerance"]
    assert gate["d_compiled"] <= 1e-10 and gate["float64_moves"] < 1e-10  # the copy is off the kink
    assert "cannot judge here" in caplog.text and "-> trusted" in caplog.text

    # off everywhere: refused at the copy, where float64 is smooth
    engine._compiled_fused, engine.gate = kinked_compiled(compiled, 1 + 1e-6, 1 + 1e-6), None
    with pytest.raises(ConfigError) as info:
        learner.backward(kinked_tasks())
    assert "where float64 is smooth" in str(info.value) and "'model." in str(info.value)

    monkeypatch.setattr(gate_module, "GATE_PLACES", 1)  # off at the kink, and only the kinked batch to judge at
    engine._compiled_fused, engine.gate = kinked_compiled(compiled, 1 + 1e-6), None
    with pytest.raises(ConfigError) as info:
        learner.backward(kinked_tasks())
    assert "at every place tried (1" in str(info.value) and "discontinuity" in str(info.value)


@pytest.mark.usefixtures("aot_eager")
def test_where_float32_is_rough_everywhere_the_compiled_code_is_judged_in_float64(monkeypatch, caplog):
    """A float32 model whose only place to judge sits on a kink: float32 cannot tell a compiled result on
    the far side from worse arithmetic, so the gate runs the compiled code in float64 (a graph of its own,
    not counted as training's) and trusts it when it equals eager float64 to 1e-10 and its float32 result
    is within float64's movement under rounding; a compiled code that is wrong in float64, or a float32
    result farther off than rounding moves float64, is refused."""
    monkeypatch.setattr(gate_module, "GATE_PLACES", 1)
    learner = kinked_learner(torch.float32)
    learner.backward(kinked_tasks(torch.float32))
    engine = learner.engines["compile"]
    compiled, graphs = engine._compiled_fused, engine.compiles
    # far side of the kink and 1e-4 off there in float32 (16x the bound eager's noise sets), exact in float64
    engine._compiled_fused, engine.gate = kinked_compiled(compiled, 1 + 1e-4, in_float64=1.0), None
    with caplog.at_level(logging.INFO, logger="metaopt.engines"):
        learner.backward(kinked_tasks(torch.float32))
    gate = engine.gate
    assert gate["passed"] and gate["judged_at"].startswith("the compiled code in float64")
    assert gate["d_compiled"] > gate["tolerance"] and gate["d_compiled"] <= gate["float64_moves"]
    assert gate["float64_compiled"] <= 1e-10 and gate["float64_moves"] > 1e-3
    assert any(r.levelname == "WARNING" and "rough at rounding level" in r.message for r in caplog.records)
    assert engine.compiles == graphs and engine.gate_graphs_compiled == 1  # the float64 graph is the gate's

    # the same in float32, but the compiled code computes 1e-6 more in float64: another function
    engine._compiled_fused, engine.gate = kinked_compiled(compiled, 1 + 1e-4, in_float64=1 + 1e-6), None
    with pytest.raises(ConfigError) as info:
        learner.backward(kinked_tasks(torch.float32))
    assert "computes another function" in str(info.value) and "'model." in str(info.value)

    # exact in float64, but the float32 result doubled at the kink: farther off than rounding moves float64
    engine._compiled_fused, engine.gate = kinked_compiled(compiled, 2.0, in_float64=1.0), None
    with pytest.raises(ConfigError) as info:
        learner.backward(kinked_tasks(torch.float32))
    assert "than rounding moves float64" in str(info.value)


def test_the_rounding_model_rounds_arithmetic_once_per_result_and_leaves_exact_results_alone():
    x = torch.linspace(-1, 1, 7, dtype=torch.float64)
    with gate_module.RoundingMode(1e-3, draw=0):
        exact = [torch.relu(x), x.reshape(7, 1).squeeze(1), torch.stack([x])[0], -x, torch.floor(x), torch.ones(7)]
        rounded = x * 3.0
    with gate_module.RoundingMode(1e-3, draw=0, sign=-1.0):
        negated = x * 3.0
    expected = (torch.relu(x), x, x, -x, torch.floor(x), torch.ones(7, dtype=torch.float64))
    for result, value in zip(exact, expected, strict=True):
        assert torch.equal(result, value)  # copies, views, selections, integers, constants: exact
    relative = (rounded / (x * 3.0) - 1)[x != 0]
    assert 1e-5 < float(relative.abs().max()) < 1e-2  # one rounding of size eps = 1e-3, not zero
    torch.testing.assert_close((negated / (x * 3.0) - 1)[x != 0], -relative)  # the antithetic draw
    state = torch.random.get_rng_state()
    with gate_module.RoundingMode(1e-3, draw=0):
        x + 1
    assert torch.equal(state, torch.random.get_rng_state())  # its own generator


@pytest.mark.usefixtures("aot_eager")
def test_the_one_graph_meta_gradient_takes_any_weighting_of_the_tasks():
    """The fused path computes the gradient of the tasks' sum with their losses; a mean or sum scales it,
    and any other weighting of the per-task losses recomputes it with those weights (float64, vs eager)."""
    learner = MetaLearner(seeded_mlp(), inner_steps=2, inner_lr=0.3, loss_fn=F.mse_loss, engine="compile")
    tasks = regression_tasks(3)
    learner.backward(tasks)
    engine, ctx = learner.engines["compile"], learner.engine_context
    assert engine.fused
    batch = learner._begin(tasks, training=True)
    parts = [torch.stack([t[i] for t in batch.data]) for i in range(4)]
    start = ctx.start_params(True)
    engine.backend.prepare(True)
    try:
        with torch.enable_grad():
            fused, metrics = engine._chunk(ctx, batch, start, parts, ctx.finite_check)
            with engine.eager():
                eager, eager_metrics = engine._chunk(ctx, batch, start, parts, ctx.finite_check)
    finally:
        engine.backend.release()
    assert torch.allclose(fused, eager, rtol=1e-12) and torch.allclose(
        metrics["query_loss"], eager_metrics["query_loss"]
    )
    assert not metrics["query_loss"].requires_grad
    params = list(start.values())
    for weights in (torch.full((3,), 1 / 3, dtype=torch.float64), torch.tensor([0.2, -1.0, 3.0], dtype=torch.float64)):
        got = torch.cat([g.flatten() for g in torch.autograd.grad(fused, params, weights, retain_graph=True)])
        want = torch.cat([g.flatten() for g in torch.autograd.grad(eager, params, weights, retain_graph=True)])
        assert float((got - want).norm() / want.norm()) <= 1e-10


class LateRegulariser:
    """A plugin whose loss term reads its own parameter, but only from the second batch on."""

    name = "late_regulariser"

    def __init__(self) -> None:
        self.weight = torch.nn.Parameter(torch.tensor(0.5, dtype=torch.float64))
        self.on = False

    @hookimpl
    def plugin_modules(self, learner):
        return {"late": torch.nn.ParameterList([self.weight])}

    @hookimpl
    def loss_modification(self, task, params, loss):
        if not self.on:
            return None
        return {"late": self.weight * sum(p.pow(2).sum() for p in params.values())}


@pytest.mark.usefixtures("aot_eager")
def test_a_hook_that_reads_other_meta_parameters_only_later_is_refused_not_given_a_wrong_gradient():
    plugin = LateRegulariser()
    learner = MetaLearner(seeded_mlp(), [plugin], inner_steps=2, inner_lr=0.3, loss_fn=F.mse_loss, engine="compile")
    learner.backward(regression_tasks(3))
    assert learner.engines["compile"].fused  # the first batch read only the adapted start
    plugin.on = True
    before = [p.grad.clone() for p in learner.model.parameters()]
    with pytest.raises(ConfigError, match=r"read no other meta-parameter.*engine='vmap'"):
        learner.backward(regression_tasks(3))
    assert all(torch.equal(a, p.grad) for a, p in zip(before, learner.model.parameters(), strict=True))


@pytest.mark.usefixtures("aot_eager")
@pytest.mark.parametrize("engine", ["loop", "vmap", "compile"])
def test_a_finished_batch_is_freed_without_the_garbage_collector(engine, monkeypatch):
    """No reference cycle through a batch: its data, graph and meta-gradient go when the step ends, not
    when Python's cycle collector next runs (which on a GPU would hold memory for several batches)."""
    import gc
    import weakref

    from metaopt.task import Batch

    made, init = [], Batch.__init__

    def recording_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        made.append(weakref.ref(self))

    learner = MetaLearner(seeded_mlp(), inner_steps=2, inner_lr=0.3, loss_fn=F.mse_loss, engine=engine)
    learner.backward(regression_tasks(3))  # compiles and runs the gate first
    monkeypatch.setattr(Batch, "__init__", recording_init)
    gc.collect()
    gc.disable()
    try:
        for _ in range(3):
            result = learner.backward(regression_tasks(3))
            assert len(result.per_task["query_loss"]) == 3
        del result
        assert made and all(ref() is None for ref in made)
    finally:
        gc.enable()


def stored_gradients(monkeypatch, plain: bool, task_chunk: int | None, setup=None) -> tuple[dict, list[bool]]:
    """Two float32 batches' meta-gradients (accumulated in .grad, as a user's loop with one zero_grad
    per two batches does) from the compile engine, with the direct store allowed or not; and what
    stores_plainly answered."""
    answers = []
    real = compile_engine.stores_plainly

    def spy(leaves, grads):
        answers.append(plain and real(leaves, grads))
        return answers[-1]

    monkeypatch.setattr(compile_engine, "stores_plainly", spy)
    torch.manual_seed(0)
    learner = MetaLearner(
        mlp(), inner_steps=2, inner_lr=0.3, loss_fn=F.mse_loss, engine="compile", task_chunk=task_chunk
    )
    if setup is not None:
        setup(learner)
    for seed in (1, 2):
        learner.backward(regression_tasks(3, dtype=torch.float32, seed=seed))  # chunks of 2 and 1
    return {n: p.grad.clone() for n, p in learner.named_parameters()}, answers


@pytest.mark.slow
@pytest.mark.usefixtures("aot_eager")
@pytest.mark.parametrize("task_chunk", [None, 2])
def test_the_meta_gradient_stored_without_autograd_is_autograds_bit_for_bit(monkeypatch, task_chunk):
    """With the default outer step and no accelerator, the fused chunk's gradient goes into .grad
    directly (no autograd backward to hand it out); it is the autograd path's, bit for bit, in one
    chunk and in several (float32, so any difference in weighting or summation order would show)."""
    direct, answers = stored_gradients(monkeypatch, True, task_chunk)
    through_autograd, refused = stored_gradients(monkeypatch, False, task_chunk)
    assert answers and all(answers) and not any(refused)
    assert direct.keys() == through_autograd.keys()
    assert all(torch.equal(direct[n], through_autograd[n]) for n in direct)


@pytest.mark.usefixtures("aot_eager")
def test_gradient_hooks_and_an_accelerator_keep_the_meta_gradient_on_autograd(monkeypatch):
    """A hook on a parameter's gradient fires, and an accelerator's backward is called: the direct
    store is taken only when autograd would do nothing but store the gradient."""
    seen = []

    def hooked(learner):
        learner.model.head.weight.register_hook(lambda g: seen.append(g.clone()))

    grads, answers = stored_gradients(monkeypatch, True, None, hooked)
    assert answers and not any(answers)
    assert torch.equal(seen[-2] + seen[-1], grads["model.head.weight"])  # both batches went through the hook

    class Accelerator:
        num_processes = 1

        def __init__(self) -> None:
            self.losses = []

        def backward(self, loss):
            self.losses.append(loss)
            loss.backward()

        def autocast(self):
            import contextlib

            return contextlib.nullcontext()

    accelerator = Accelerator()

    def accelerated(learner):
        learner.accelerator = accelerator

    with_accelerator, _ = stored_gradients(monkeypatch, True, None, accelerated)
    assert len(accelerator.losses) >= 2
    assert all(torch.equal(grads[n], with_accelerator[n]) for n in grads)


class RefusesLargeLosses:
    """A user's plugin that checks a value inside a hook and raises its own error."""

    @hookimpl
    def loss_modification(self, task, loss, params):
        raise ValueError("my plugin: this loss is too large; lower the learning rate")
        return None


@pytest.mark.usefixtures("aot_eager")
def test_an_error_raised_inside_the_compiled_body_reaches_the_user_as_itself():
    """dynamo turns an exception raised while tracing into "Observed exception"; the engine re-runs the
    chunk eagerly so the user gets the error that names their value, not a vague compile refusal."""
    learner = MetaLearner(
        seeded_mlp(), [RefusesLargeLosses()], inner_steps=1, inner_lr=0.3, loss_fn=F.mse_loss, engine="compile"
    )
    with pytest.raises(Exception, match=r"refuseslargelosses.*loss_modification.*this loss is too large") as info:
        learner.backward(regression_tasks(3))
    assert "cannot compile" not in str(info.value)
    learner = MetaLearner(seeded_mlp(), [], inner_steps=2, inner_lr=[0.1, 0.2], loss_fn=F.mse_loss, engine="compile")
    with pytest.raises(ConfigError, match=r"5 inner steps asked for, but inner_lr has only 2 per-step values"):
        learner.evaluate(regression_tasks(3), steps=5)


def test_compile_refusals_are_named_when_the_learner_is_built():
    with pytest.raises(ConfigError, match=r"engine='compile' cannot run.*convergent_fo.*Use engine='vmap' or 'loop'"):
        MetaLearner(seeded_mlp(), ["convergent_fo"], loss_fn=F.mse_loss, engine="compile")
    with pytest.raises(ConfigError, match=r"engine='compile' cannot run.*memory='recompute'"):
        MetaLearner(seeded_mlp(), loss_fn=F.mse_loss, engine="compile", memory="recompute")


def test_the_cli_reports_compilation_and_the_gate(tmp_path, capsys, monkeypatch):
    from metaopt.cli import main

    monkeypatch.setattr(compile_engine, "COMPILE_BACKEND", "aot_eager")
    out = tmp_path / "run"
    argv = ["train", "--data", "sinusoid", "--iterations", "3", "--meta-batch", "4", "--engine", "compile"]
    assert main([*argv, "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "on the compile engine" in printed and "compiled 1 graph(s)" in printed and "exactness gate" in printed
    assert "(meta-gradient inside the graph, 4 task(s) per call)" in printed  # no convolution: the whole batch
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [line for line in lines if "meta_loss" in line]
    assert steps and all(s["engine"] == "compile" and s["recompiles"] == 0 for s in steps)
    assert all(s["meta_gradient_in_graph"] and s["tasks_per_call"] == 4 for s in steps)
    assert steps[-1]["gate"]["d_compiled"] <= steps[-1]["gate"]["tolerance"]
    # where the gate judged and how far float64 moved there (a smooth sinusoid MLP: about float32's eps)
    assert steps[-1]["gate"]["judged_at"] == "the batch" and 0 < steps[-1]["gate"]["float64_moves"] < 1e-5
    assert "at the batch; float64 moves" in printed


def test_the_cli_reports_a_gate_that_judged_the_compiled_code_in_float64(tmp_path, capsys, monkeypatch):
    """The plumbing of the rough-everywhere verdict to disk and console: the place's float32 judgement is
    made to say "refused, float64 moves by 1.0" (a rough meta-gradient), and the float64 check runs for real."""
    from metaopt.cli import main

    judge = gate_module.judge

    def rough(*args):
        return {**judge(*args), "passed": False, "float64_moves": 1.0}

    monkeypatch.setattr(compile_engine, "COMPILE_BACKEND", "aot_eager")
    monkeypatch.setattr(gate_module, "judge", rough)
    monkeypatch.setattr(gate_module, "GATE_PLACES", 1)
    out = tmp_path / "run"
    argv = ["train", "--data", "sinusoid", "--iterations", "2", "--meta-batch", "4", "--engine", "compile"]
    assert main([*argv, "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "trusted by its exactness gate in float64 (the meta-gradient is rough at rounding level" in printed
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    gate = [s for s in steps if "meta_loss" in s][-1]["gate"]
    assert gate["judged_at"].startswith("the compiled code in float64") and gate["float64_compiled"] <= 1e-10
    assert "compiled 1 graph(s)" in printed  # the gate's float64 graph is not training's


def conv_bn_pool():
    torch.manual_seed(0)
    body = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.MaxPool2d(2), torch.nn.Flatten()
    )
    from metaopt import HeadedModel

    return HeadedModel(body, torch.nn.Linear(4 * 2 * 2, 3)).double()


@pytest.mark.usefixtures("aot_eager")
@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("name", ["conv_bn_pool", "layer_norm"])
def test_compiled_meta_gradient_equals_the_loop_and_central_differences(name, steps):
    """Independent of every engine: central differences (Richardson) of the float64 meta-objective,
    computed with the loop engine's forward only (after its own backward, which leaves values alone)."""
    from test_engine import layer_norm

    make_model = {"conv_bn_pool": conv_bn_pool, "layer_norm": layer_norm}[name]
    tasks = image_tasks()
    learners = {e: MetaLearner(make_model(), inner_steps=steps, inner_lr=0.3, engine=e) for e in ("compile", "loop")}
    grads = {e: gradient(learner, tasks) for e, learner in learners.items()}
    assert learners["compile"].engines["compile"].fused  # the one-graph meta-gradient is what is checked
    assert float((grads["compile"] - grads["loop"]).norm() / grads["loop"].norm()) <= 1e-10
    reference, size = learners["loop"], sum(p.numel() for p in learners["loop"].model.parameters())
    compiled = grads["compile"][:size]  # the model's parameters come first
    assert_meta_gradient_matches_central_differences(reference, tasks, compiled, seed=3)
