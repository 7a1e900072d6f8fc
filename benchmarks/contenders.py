"""Speed contenders, registered by name: metaopt's configurations and the hand-written loops.

A contender is a function ``build(model, steps, lr, loss_fn) -> Built`` (the step function that
computes the meta-gradient of a list of tasks into ``.grad``, the parameters the outer optimizer
steps, and the learner for metaopt's rows).  Adding one is one registered entry
(docs/benchmarks/README.md, "Adding a contender or a workload")::

    @CONTENDERS.decorator("my loop")
    def my_loop(model, steps, lr, loss_fn):
        def step(tasks):
            ...  # meta-gradient into model's .grad
        return Built(step, list(model.parameters()), hand=True)

``hand=True`` marks a hand-written loop (the speed tables' "fastest hand-written loop"); ``maml``
says whether it computes plain MAML's meta-gradient (then it is checked against float64).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from registry import Registry


@dataclass
class Built:
    step: Callable[[list[Any]], None]
    params: list[Any]
    learner: Any = None
    hand: bool = False


@dataclass(frozen=True)
class Contender:
    build: Callable[..., Built]
    hand: bool = False
    maml: bool = True  # computes plain MAML's meta-gradient (checked against the float64 reference)
    options: dict[str, Any] = field(default_factory=dict)


CONTENDERS: Registry[Contender] = Registry("contender")


def metaopt_contender(name: str, plugins: list[Any] = (), **options: Any) -> None:
    """Register metaopt with ``plugins`` (names or (name, kwargs)) and MetaLearner ``options``."""
    plugins = list(plugins)

    def build(model, steps: int, lr: float, loss_fn) -> Built:
        learner, step = metaopt_step_fn(model, plugins, steps, lr, loss_fn, **options)
        return Built(step, list(learner.meta_parameters()), learner)

    CONTENDERS.register(name, Contender(build, maml=not plugins, options=options))


SHARP_BOTH = ("sharp_maml", {"rho_inner": 0.05, "rho_outer": 0.05})
metaopt_contender("metaopt maml")
metaopt_contender("metaopt maml (torch.func backend)", backend="torch.func")
metaopt_contender("metaopt maml (torch.func, check_finite=False)", backend="torch.func", check_finite=False)
metaopt_contender("metaopt maml (per_task_backward=False)", per_task_backward=False)
metaopt_contender("metaopt maml (vmap)", engine="vmap")
metaopt_contender("metaopt maml (vmap, check_finite=False)", engine="vmap", check_finite=False)
metaopt_contender("metaopt maml (auto)", engine="auto")
metaopt_contender("metaopt maml (compile)", engine="compile")


def _compiled_with(mode: str) -> Callable[..., Built]:
    def build(model, steps: int, lr: float, loss_fn) -> Built:
        import metaopt.engines.compile as compile_engine

        compile_engine.COMPILE_MODE = mode  # this worker process only
        learner, step = metaopt_step_fn(model, [], steps, lr, loss_fn, engine="compile")
        return Built(step, list(learner.meta_parameters()), learner)

    return build


# CUDA graphs through torch.compile's "reduce-overhead" mode (on CPU the same as plain compile)
CONTENDERS.register("metaopt maml (compile, CUDA graphs)", Contender(_compiled_with("reduce-overhead")))
metaopt_contender("metaopt fomaml", ["fomaml"])
metaopt_contender("metaopt convergent_fo", ["convergent_fo"])
metaopt_contender("metaopt shot", ["shot"])
metaopt_contender("metaopt sharp_maml (both)", [SHARP_BOTH])
metaopt_contender("metaopt hypermaml", ["hypermaml"])
metaopt_contender("metaopt anil", ["anil"])
metaopt_contender("metaopt meta_sgd", ["meta_sgd"])
metaopt_contender("metaopt maml_pp", [("maml_pp", {"msl_iters": 100})])
metaopt_contender("metaopt fomaml (vmap)", ["fomaml"], engine="vmap")
metaopt_contender("metaopt shot (vmap)", ["shot"], engine="vmap")
metaopt_contender("metaopt sharp_maml (both, vmap)", [SHARP_BOTH], engine="vmap")
metaopt_contender("metaopt shot+sharp_maml (both, vmap)", ["shot", SHARP_BOTH], engine="vmap")
metaopt_contender("metaopt shot+sharp_maml (both)", ["shot", SHARP_BOTH])


def hand_contender(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a hand-written loop: ``fn(model, steps, lr, loss_fn)`` returns its step function."""

    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        def build(model, steps: int, lr: float, loss_fn) -> Built:
            return Built(fn(model, steps, lr, loss_fn), list(model.parameters()), hand=True)

        CONTENDERS.register(name, Contender(build, hand=True))
        return fn

    return register


def metaopt_step_fn(model, plugins, steps: int, lr: float, loss_fn, **options: Any):
    from metaopt import MetaLearner
    from metaopt.registry import create_plugin

    made = [create_plugin(p) if isinstance(p, str) else create_plugin(p[0], **p[1]) for p in plugins]
    learner = MetaLearner(model, made, inner_steps=steps, inner_lr=lr, loss_fn=loss_fn, **options)
    return learner, lambda tasks: learner.backward(tasks)


@hand_contender("raw higher")
def higher_step_fn(model, steps: int, lr: float, loss_fn):
    import higher
    import torch

    inner = torch.optim.SGD(model.parameters(), lr=lr)

    def step(tasks):
        for sx, sy, qx, qy in tasks:
            with higher.innerloop_ctx(model, inner, copy_initial_weights=False) as (fmodel, diffopt):
                for _ in range(steps):
                    diffopt.step(loss_fn(fmodel(sx), sy))
                (loss_fn(fmodel(qx), qy) / len(tasks)).backward()

    return step


@hand_contender("torch.func")
def func_step_fn(model, steps: int, lr: float, loss_fn):
    import torch
    from torch.func import functional_call

    names = [n for n, _ in model.named_parameters()]

    def step(tasks):
        params = dict(model.named_parameters())
        buffers = dict(model.named_buffers())
        total = 0.0
        for sx, sy, qx, qy in tasks:
            fast = params
            for _ in range(steps):
                loss = loss_fn(functional_call(model, (fast, buffers), (sx,)), sy)
                grads = torch.autograd.grad(loss, [fast[n] for n in names], create_graph=True)
                fast = {n: fast[n] - lr * g for n, g in zip(names, grads)}
            total = total + loss_fn(functional_call(model, (fast, buffers), (qx,)), qy)
        (total / len(tasks)).backward()

    return step


@hand_contender("torchopt")
def torchopt_step_fn(model, steps: int, lr: float, loss_fn):
    import torchopt

    inner = torchopt.MetaSGD(model, lr=lr)

    def step(tasks):
        state = torchopt.extract_state_dict(model, enable_visual=False)
        for sx, sy, qx, qy in tasks:
            for _ in range(steps):
                inner.step(loss_fn(model(sx), sy))
            (loss_fn(model(qx), qy) / len(tasks)).backward()
            torchopt.recover_state_dict(model, state)

    return step


def hand_task(model, steps: int, lr: float, loss_fn):
    """One task's MAML query loss written with torch.func (for vmap over tasks); BatchNorm modules
    lose their running statistics (see :func:`hand_vmap_step`)."""
    import torch
    from torch.func import functional_call, grad

    torch.func.replace_all_batch_norm_modules_(model)

    def task(params, sx, sy, qx, qy):
        for _ in range(steps):
            g = grad(lambda p: loss_fn(functional_call(model, p, (sx,)), sy))(params)
            params = {n: params[n] - lr * g[n] for n in params}
        return loss_fn(functional_call(model, params, (qx,)), qy)

    return task


def hand_vmap_step(model, steps: int, lr: float, loss_fn, compiled: bool):
    """All tasks at once: torch.func.vmap over tasks of an inner loop written with torch.func.grad
    (``compiled``: the whole batched task function under torch.compile, backend as metaopt's engine).

    BatchNorm modules lose their running statistics (functorch's replace_all_batch_norm_modules_,
    the documented way to run them under vmap); their second-order gradient under vmap is then
    torch's (see the float64 check column: pytorch/functorch #534).
    """
    import torch
    from torch.func import vmap

    batched = vmap(hand_task(model, steps, lr, loss_fn), in_dims=(None, 0, 0, 0, 0), randomness="different")
    if compiled:
        batched = torch.compile(batched, backend=os.environ.get("METAOPT_COMPILE_BACKEND", "inductor"))

    def step(tasks):
        stacked = [torch.stack([t[i] for t in tasks]) for i in range(4)]
        batched(dict(model.named_parameters()), *stacked).mean().backward()

    return step


@hand_contender("hand vmap (compiled meta-gradient)")
def hand_vmap_compiled_meta_gradient_step_fn(model, steps: int, lr: float, loss_fn):
    """The hand vmap step with the outer gradient inside the compiled function too: torch.compile of
    torch.func.grad of the batch's mean query loss (one graph, no autograd backward at run time)."""
    import torch
    from torch.func import grad, vmap

    task = hand_task(model, steps, lr, loss_fn)

    def meta_loss(params, *stacked):
        return vmap(task, in_dims=(None, 0, 0, 0, 0), randomness="different")(params, *stacked).mean()

    meta_gradient = torch.compile(grad(meta_loss), backend=os.environ.get("METAOPT_COMPILE_BACKEND", "inductor"))

    def step(tasks):
        stacked = [torch.stack([t[i] for t in tasks]) for i in range(4)]
        params = dict(model.named_parameters())
        grads = meta_gradient({n: p.detach() for n, p in params.items()}, *stacked)
        for n, p in params.items():
            p.grad = grads[n] if p.grad is None else p.grad.add_(grads[n])

    return step


@hand_contender("hand vmap")
def hand_vmap_step_fn(model, steps: int, lr: float, loss_fn):
    return hand_vmap_step(model, steps, lr, loss_fn, compiled=False)


@hand_contender("hand vmap (compiled)")
def hand_vmap_compiled_step_fn(model, steps: int, lr: float, loss_fn):
    return hand_vmap_step(model, steps, lr, loss_fn, compiled=True)
