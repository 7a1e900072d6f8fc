"""Composition rules: replace / wrap / add, conflicts at build time, describe()."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import regression_tasks

from metaopt import MetaLearner, PluginConflictError, PluginError, hookimpl
from metaopt.errors import ConfigError, PluginHookError
from metaopt.models import mlp


class ScaledStep:
    """replace: SGD step with a doubled learning rate."""

    name = "scaled_step"

    @hookimpl
    def inner_step(self, task, trajectory, params, grads):
        return {n: p - 2 * trajectory.lr * grads[n] for n, p in params.items()}


class CountingWrapper:
    """wrap: counts inner steps and records the order it sees them."""

    name = "counting"

    def __init__(self, log):
        self.log = log

    @hookimpl(wrapper=True)
    def inner_step(self, task, trajectory, params, grads):
        self.log.append(f"{self.name}:before")
        result = yield
        self.log.append(f"{self.name}:after")
        return result


class L2Term:
    """add: an L2 penalty on the adapted head weight."""

    name = "l2"

    def __init__(self, weight=0.5):
        self.weight = weight

    @hookimpl
    def loss_modification(self, task, params, loss):
        return {"l2": self.weight * params["head.weight"].pow(2).sum()}


def test_wrap_replace_and_add_compose_in_one_learner():
    torch.manual_seed(0)
    model = mlp().double()
    tasks = regression_tasks(2)
    log: list[str] = []
    learner = MetaLearner(
        model, [CountingWrapper(log), ScaledStep(), L2Term(0.5)], inner_steps=2, inner_lr=0.01, loss_fn=F.mse_loss
    )
    result = learner.backward(tasks)
    assert log == ["counting:before", "counting:after"] * 4  # 2 tasks x 2 steps
    # independent computation: SGD at 2*lr, plus the L2 term on the adapted head weight
    params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    total = 0
    for sx, sy, qx, qy in tasks:
        fast = dict(params)
        for _ in range(2):
            loss = F.mse_loss(torch.func.functional_call(model, fast, (sx,)), sy)
            g = torch.autograd.grad(loss, list(fast.values()), create_graph=True)
            fast = {n: p - 0.02 * gi for (n, p), gi in zip(fast.items(), g)}
        q = F.mse_loss(torch.func.functional_call(model, fast, (qx,)), qy)
        total = total + q + 0.5 * fast["head.weight"].pow(2).sum()
    ref = torch.autograd.grad(total / 2, list(params.values()))
    for (n, p), r in zip(model.named_parameters(), ref):
        assert (p.grad - r).abs().max() < 1e-10, n
    assert "l2" in result.metrics and result.metrics["meta_loss"] > result.metrics["query_loss"]


def test_wrappers_nest_in_listed_order():
    log: list[str] = []
    first, second = CountingWrapper(log), CountingWrapper(log)
    first.name, second.name = "first", "second"
    learner = MetaLearner(mlp(), [first, second], inner_steps=1, loss_fn=F.mse_loss)
    learner.evaluate(regression_tasks(1, dtype=torch.float32))
    assert log == ["first:before", "second:before", "second:after", "first:after"]


def test_two_replace_plugins_conflict_at_build_time():
    other = ScaledStep()
    other.name = "other_step"
    with pytest.raises(PluginConflictError) as info:
        MetaLearner(mlp(), [ScaledStep(), other])
    message = str(info.value)
    assert "scaled_step" in message and "other_step" in message and "inner_step" in message


def test_declared_incompatibility_is_reported_with_advice():
    class Picky:
        name = "picky"
        incompatible_with = {"l2": "drop l2; picky regularises already."}

    with pytest.raises(PluginConflictError, match="drop l2"):
        MetaLearner(mlp(), [Picky(), L2Term()])


def test_unknown_hook_name_is_rejected_when_registered():
    class Typo:
        name = "typo"

        @hookimpl
        def inner_stepp(self, task):
            return None

    with pytest.raises(PluginError, match="inner_step"):
        MetaLearner(mlp(), [Typo()])


def test_wrong_hook_arguments_rejected_when_registered():
    class BadArgs:
        name = "bad_args"

        @hookimpl
        def inner_step(self, task, trajectory, params, grads, extra):
            return None

    with pytest.raises(PluginError, match="bad_args"):
        MetaLearner(mlp(), [BadArgs()])


def test_class_instead_of_instance_and_duplicates_are_errors():
    with pytest.raises(PluginError, match="instance"):
        MetaLearner(mlp(), [L2Term])
    with pytest.raises(PluginConflictError, match="twice"):
        MetaLearner(mlp(), [L2Term(), L2Term()])


def test_describe_lists_plugins_per_hook_in_firing_order():
    log: list[str] = []
    learner = MetaLearner(mlp(), [CountingWrapper(log), ScaledStep(), L2Term()])
    text = learner.describe()
    lines = text.splitlines()
    assert lines[0].startswith("adapted_params")
    step_line = next(line for line in lines if line.startswith("inner_step"))
    assert step_line.index("counting [wrap]") < step_line.index("scaled_step") < step_line.index("builtin:maml")
    assert any(line.startswith("loss_modification") and "l2" in line for line in lines)
    assert lines.index(step_line) < [i for i, line in enumerate(lines) if line.startswith("outer_step")][0]


class Raising:
    """Raises ``exc`` from ``hook`` (plain or wrapper) at the second task."""

    name = "raising"

    def __init__(self, exc):
        self.exc = exc

    @hookimpl
    def inner_step(self, task, trajectory, params, grads):
        if task.index == 1:
            raise self.exc
        return None

    @hookimpl(wrapper=True)
    def outer_loss(self, task, params):
        loss = yield
        if isinstance(self.exc, LookupError):
            raise self.exc
        return loss


def test_plugin_exception_names_plugin_hook_and_task_and_keeps_the_cause():
    model = mlp().double()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    learner = MetaLearner(model, [Raising(ValueError("bad value"))], loss_fn=F.mse_loss)
    with pytest.raises(PluginHookError, match=r"plugin 'raising' raised in hook 'inner_step' \(task 1\)") as info:
        learner.backward(regression_tasks(2))
    assert (info.value.plugin, info.value.hook, info.value.task) == ("raising", "inner_step", 1)
    assert isinstance(info.value.__cause__, ValueError)
    assert all(torch.equal(before[n], p) and p.grad is None for n, p in model.named_parameters())


def test_failed_backward_leaves_accumulated_gradients_untouched():
    model = mlp().double()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    learner = MetaLearner(model, [Raising(ValueError("bad value"))], loss_fn=F.mse_loss)
    with pytest.raises(PluginHookError):
        learner.backward(regression_tasks(2))  # task 0 was already backpropagated when task 1 failed
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in model.parameters())


def test_wrapper_exceptions_are_named_once_and_own_errors_pass_through():
    learner = MetaLearner(mlp().double(), [Raising(KeyError("k"))], loss_fn=F.mse_loss, inner_steps=0)
    with pytest.raises(PluginHookError, match=r"^plugin 'raising' raised in hook 'outer_loss' \(task 0\): KeyError"):
        learner.backward(regression_tasks(1))
    own = MetaLearner(mlp().double(), [Raising(ConfigError("set x"))], loss_fn=F.mse_loss)
    with pytest.raises(ConfigError, match="^set x$"):
        own.backward(regression_tasks(2))
    interrupt = MetaLearner(mlp().double(), [Raising(KeyboardInterrupt())], loss_fn=F.mse_loss)
    with pytest.raises(KeyboardInterrupt):
        interrupt.backward(regression_tasks(2))


class PlainTerms:
    """Plain (non-wrapper) implementations: one returning a value, one returning None."""

    name = "plain_terms"

    @hookimpl
    def loss_modification(self, task, params, loss):
        return {"term": loss * 2}

    @hookimpl
    def task_end(self, task):
        return None


class WrapsTaskStart:
    name = "wraps_task_start"

    @hookimpl(wrapper=True)
    def task_start(self, task):
        return (yield)


def test_the_engines_relay_returns_what_pluggy_returns_and_skips_only_the_given_plugin():
    import pluggy

    learner = MetaLearner(mlp(), [PlainTerms(), WrapsTaskStart()], loss_fn=F.mse_loss)
    host, finite = learner.host, learner.host.finite_check
    relay = host.hook_without(finite)
    assert set(vars(relay)) == set(vars(host.hook))
    builtin = host.plugin("builtin:maml")
    for name in vars(host.hook):
        impls = [i for i in getattr(host.hook, name).get_hookimpls() if i.plugin is not finite]
        fast, caller = getattr(relay, name), host.pm.subset_hook_caller(name, [finite])
        plain_one = len(impls) == 1 and not (impls[0].wrapper or impls[0].hookwrapper)
        # pluggy's own caller exactly where a call needs its machinery (a wrapper, several implementations)
        assert isinstance(fast, pluggy.HookCaller) == (len(impls) > 0 and not plain_one), name
        if isinstance(fast, pluggy.HookCaller):
            assert fast.get_hookimpls() == impls, name
        elif not impls or impls[0].plugin is not builtin:  # callable here without a real task
            kwargs = {arg: torch.tensor(3.0) for arg in caller.spec.argnames}
            assert repr(fast(**kwargs)) == repr(caller(**kwargs)), name
    assert relay.loss_modification(task=None, params={}, loss=torch.tensor(3.0))[0]["term"] == 6.0
    assert relay.task_end(task=None) == host.hook.task_end(task=None) == []  # an implementation returning None
    assert relay.after_inner_step(task=None, trajectory=None, params={}) == []  # no implementation
    assert relay.batch_start(batch=None) == []  # only the skipped plugin implements it
    with pytest.raises(pluggy.HookCallError, match="loss"):
        relay.loss_modification(task=None, params={})
    assert vars(host.hook_without(None)).keys() == vars(relay).keys()  # check_finite=False: nothing skipped
