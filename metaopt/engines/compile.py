"""``engine="compile"``: the vmap engine's chunk under ``torch.compile``, trusted only after a gate.

The whole task body of a chunk (every hook, the inner loop with ``torch.func.grad``, the outer
loss) is one ``torch.compile``d function of the chunk's tensors; a chunk is one task for a model
with convolutions (plain convolutions in the graph, faster on CPU than vmap's grouped ones), else
the batch, unless ``task_chunk`` is set.  In training, when every
meta-parameter the body reads comes in through the adapted start (:func:`probe_fusable`), the
compiled function is ``torch.func.grad`` of the tasks' summed losses, so the meta-gradient is
computed inside the same graph (:func:`fused_meta_gradient`, handed to autograd by
:class:`_FusedMetaStep`); otherwise the outer backward runs through the compiled graph's
backward.  Compilation reorders floating-point operations, and a
second-order meta-gradient can be badly conditioned, so before the first training step the
engine proves itself on the user's own model and first batch (:mod:`metaopt.engines.gate`).

The gate's verdict is kept in ``engine.gate``.  Each (task shape, training/evaluation) compiles
once; ``engine.compiles`` counts graphs and ``engine.recompiles`` any compilation after a key's first call (0 expected),
``engine.compile_seconds`` the wall time of first calls (compilation included).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import time
import types
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from metaopt.engines.base import EngineContext
from metaopt.engines.choose import has_convolutions
from metaopt.engines.gate import exactness_gate
from metaopt.engines.vmap import VmapEngine, finite_suspended
from metaopt.errors import ConfigError, MetaOptError
from metaopt.norms import SafeNormsMode
from metaopt.recompute import random_state, replaying_random
from metaopt.task import Batch, upcast

log = logging.getLogger("metaopt.engines")
#: the torch.compile backend; METAOPT_COMPILE_BACKEND=aot_eager (dynamo and AOT autograd without code
#: generation) is for quick checks of what is traced, as the tests and the device script's tiny mode do
COMPILE_BACKEND = os.environ.get("METAOPT_COMPILE_BACKEND", "inductor")
#: the torch.compile mode (None; "reduce-overhead" adds CUDA graphs on a GPU)
COMPILE_MODE: str | None = None
#: CPU graphs get inductor's C++ wrapper (the compiled call's buffer handling and kernel launches in C++,
#: not generated Python; the measurement is in docs/engines.md)
CPP_WRAPPER = True
_ENGINE_IDS = itertools.count()


class CompileEngine(VmapEngine):
    """The vmap engine with its chunk compiled (``backend``: a ``torch.compile`` backend name)."""

    name = "compile"

    def __init__(self, ctx: EngineContext, backend: str | None = None, mode: str | None = None) -> None:
        super().__init__(ctx)
        self.backend_name, self.mode = backend or COMPILE_BACKEND, mode or COMPILE_MODE
        self.compiles = 0
        self.recompiles = 0
        #: graphs compiled for the gate's float64 check of a rough meta-gradient (not training's)
        self.gate_graphs_compiled = 0
        self._gate_graph = False
        self.compile_seconds = 0.0
        self.gate: dict[str, Any] | None = None
        self._keys: set[tuple[Any, ...]] = set()
        self._warm_key: tuple[Any, ...] | None = None  # the key of the batch being run
        self._eager_chunk = super()._chunk
        # dynamo keeps compiled code per code object, with a limit on entries after which it silently runs
        # the frame eagerly: each engine compiles its own copy of the chunk's code, so learners never share
        # (or exhaust) one cache, and hitting the limit raises (compiled_call) instead of running eagerly
        fn = VmapEngine._chunk
        code = fn.__code__.replace(co_name=f"compiled_chunk_{next(_ENGINE_IDS)}")
        own = types.MethodType(types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__), self)
        self._compiled_chunk = torch.compile(own, backend=self._count, dynamic=False, fullgraph=True)
        code = fused_meta_gradient.__code__.replace(co_name=f"compiled_meta_gradient_{next(_ENGINE_IDS)}")
        own_fused = types.FunctionType(code, fused_meta_gradient.__globals__, code.co_name)
        self._compiled_fused = torch.compile(own_fused, backend=self._count, dynamic=False, fullgraph=True)
        #: whether training chunks compile forward and outer backward as one graph (None: not probed yet)
        self.fused: bool | None = None
        self.fused_reason = ""
        self._use_compiled = True
        self._convolutional: bool | None = None
        #: a fused chunk's (loss, meta-gradient, start tensors), for _backward_chunk to store without autograd
        self._direct: tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]] | None = None
        self._weights: dict[tuple[Any, ...], torch.Tensor] = {}

    def _count(self, graph: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        """The compile backend, counting every graph dynamo hands it (the gate's float64 check's apart)."""
        if self._gate_graph:
            self.gate_graphs_compiled += 1
        else:
            self.compiles += 1
            if self._warm_key is not None and self._warm_key in self._keys:
                self.recompiles += 1
        if self.backend_name == "inductor":
            from torch._inductor import list_mode_options
            from torch._inductor.compile_fx import compile_fx

            patches = dict(list_mode_options(self.mode)) if self.mode else {}  # a mode is inductor's config
            on_cpu = not any(isinstance(t, torch.Tensor) and t.device.type != "cpu" for t in example_inputs)
            if on_cpu and CPP_WRAPPER:
                patches["cpp_wrapper"] = True
            return compile_fx(graph, example_inputs, config_patches=patches)
        return torch._dynamo.lookup_backend(self.backend_name)(graph, example_inputs)

    def chunk_size(self, ctx: EngineContext, count: int) -> int:
        """``task_chunk``, else one task per compiled call for a convolutional model (its compiled
        graph then holds plain convolutions, not vmap's grouped ones: faster on CPU, measured in
        docs/engines.md), else the whole batch."""
        if ctx.task_chunk:
            return ctx.task_chunk
        if self._convolutional is None:
            self._convolutional = has_convolutions(ctx.model)
        return 1 if self._convolutional else count

    def _norm_routing(self, training: bool) -> contextlib.AbstractContextManager[Any]:
        """The function mode, which dynamo traces (SafeNorms' attribute swap would break the graph)."""
        return SafeNormsMode() if self.safe_norms else contextlib.nullcontext()

    def _chunk(self, ctx, batch, start, parts, finite):  # type: ignore[no-untyped-def, override]
        if not self._use_compiled:
            return self._eager_chunk(ctx, batch, start, parts, finite)
        config = torch._dynamo.config  # set and restored directly: config.patch costs ~15 us per call
        saved, config.fail_on_recompile_limit_hit = config.fail_on_recompile_limit_hit, True
        try:
            if batch.training and torch.is_grad_enabled():
                if self.fused is None:
                    self.fused, self.fused_reason = probe_fusable(self, ctx, batch, start, parts, finite)
                    log.info("engine='compile': %s", self.fused_reason)
                if self.fused:
                    return self._fused_chunk(ctx, batch, start, parts, finite)
            return self._compiled_chunk(ctx, batch, start, parts, finite)
        except (torch._dynamo.exc.Unsupported, torch._dynamo.exc.FailOnRecompileLimitHit) as exc:
            if _raised_while_traced(exc):  # a hook, the model or metaopt raised: show that error, not dynamo's
                self._eager_chunk(ctx, batch, start, parts, finite)
            raise ConfigError(
                f"engine='compile' cannot compile this learner's task body as one graph: {str(exc).splitlines()[0]} "
                "(a hook or the model does something torch.compile cannot trace inside torch.func.vmap, or its "
                "compiled code keeps changing). Use engine='vmap' (the same computation uncompiled) or engine='loop'."
            ) from exc
        finally:
            config.fail_on_recompile_limit_hit = saved

    def _fused_chunk(self, ctx, batch, start, parts, finite):  # type: ignore[no-untyped-def]
        """The chunk's per-task losses, their meta-gradient computed with them in one compiled graph
        (:class:`_FusedMetaStep` hands it to autograd), and the metrics."""
        names = list(start)
        # the batch holds the loss, whose graph holds run: a weak reference keeps that from being a cycle
        # (which would keep every batch's data and meta-gradient alive until the garbage collector runs)
        batch_ref = weakref.ref(batch)

        def run(weights: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[torch.Tensor]]:
            batch = batch_ref()
            if batch is None:
                raise MetaOptError(
                    "engine='compile': a backward with unequal weights on the tasks recomputes the meta-gradient "
                    "from the batch, which no longer exists; keep the batch, or weight the mean loss, or use "
                    "engine='vmap'."
                )
            if weights is None:
                weights = _equal_weights(start, parts)
            with finite_suspended(finite):
                grads, loss, metrics = self._compiled_fused(self, ctx, batch, _detached(start), parts, weights)
            # new tensor objects: a compiled graph may return one tensor as both the loss and a metric,
            # and autograd gives the loss it returns a grad_fn in place
            return loss, {k: v.detach() for k, v in metrics.items()}, [grads[n] for n in names]

        self._direct = None
        rng = random_state()
        loss, metrics, grads = run(None)
        if loss.requires_grad or any(g.requires_grad for g in grads):  # cannot be on the first batch (probed)
            raise ConfigError(
                "engine='compile' computes the meta-gradient with respect to the adapted starting point only, "
                "and the first batch read no other meta-parameter, but this batch's task body did (a hook that reads "
                "a plugin's own parameters, or parameters that are not adapted, only from some step on). Use "
                "engine='vmap' (the same computation uncompiled, through autograd) or engine='loop'."
            )
        leaves = [start[n] for n in names]
        if batch.backward_per_task and ctx.plain_backward() and stores_plainly(leaves, grads):
            self._direct = (loss, grads, leaves)  # _backward_chunk puts the gradient into .grad itself
            return loss, metrics
        return _FusedMetaStep.apply(run, rng, loss, grads, *leaves), metrics

    def _backward_chunk(self, batch: Batch, loss: torch.Tensor, count: int, whole: bool) -> torch.Tensor | None:
        """A fused chunk's meta-gradient into ``.grad`` without autograd, when :func:`stores_plainly`
        said autograd would only store or add it: the same weight (d mean / d task loss, in the loss's
        dtype), the same scaling and the same accumulation as :class:`_FusedMetaStep`'s backward."""
        direct, self._direct = self._direct, None
        if direct is None or direct[0] is not loss:
            return super()._backward_chunk(batch, loss, count, whole)
        _, grads, leaves = direct
        key = (count, loss.dtype, loss.device)
        weight = self._weights.get(key)
        if weight is None:  # 1/count in the mean's dtype, then the loss's: what autograd hands each task's loss
            weight = self._weights[key] = (upcast(loss.new_ones(())) / count).to(loss.dtype)
        for p, g in zip(leaves, _scaled(grads, weight), strict=True):  # no graph: grads do not require grad
            if p.grad is not None:
                p.grad.add_(g)
            elif g.stride() == p.stride():
                p.grad = g
            else:  # autograd keeps a gradient in its parameter's layout
                p.grad = torch.empty_strided(p.size(), p.stride(), dtype=p.dtype, device=p.device).copy_(g)
        return None  # no mean was computed: the caller averages the losses itself

    def run(self, batch: Batch, ctx: EngineContext, stacks: bool = False) -> torch.Tensor:
        key = (batch.training, *((tuple(t.shape), t.dtype) for t in batch.data[0]), len(batch.data))
        first = key not in self._keys
        self._warm_key = key
        start = time.perf_counter()  # a key's first call: compilation (and, first of all, the gate) included
        if self.gate is None and batch.training:
            self.gate = exactness_gate(self, batch, ctx)
        loss = super().run(batch, ctx, stacks)
        if first:
            self.compile_seconds += time.perf_counter() - start
            self._keys.add(key)
        return loss

    @contextlib.contextmanager
    def gate_graphs(self) -> Iterator[None]:
        """A context whose compilations are the exactness gate's (counted in ``gate_graphs_compiled``)."""
        self._gate_graph = True
        try:
            yield
        finally:
            self._gate_graph = False

    @contextlib.contextmanager
    def eager(self) -> Iterator[None]:
        """A context in which this engine runs its chunks uncompiled."""
        self._use_compiled = False
        try:
            yield
        finally:
            self._use_compiled = True


def fused_meta_gradient(
    engine: CompileEngine,
    ctx: EngineContext,
    batch: Batch,
    start: dict[str, torch.Tensor],
    parts: list[torch.Tensor],
    weights: torch.Tensor,
) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict[str, torch.Tensor]]:
    """The gradient of the chunk's weighted task losses with respect to ``start``, the losses and
    the metrics: the inner loops and the outer backward as one function (compiled as one graph)."""

    def weighted(start: dict[str, torch.Tensor]) -> tuple[torch.Tensor, tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        loss, metrics = engine._vmapped(ctx, batch, start, parts)
        wide = upcast(loss)
        return (weights.to(wide.dtype) * wide).sum(), (loss.detach(), metrics)

    grads, (loss, metrics) = torch.func.grad(weighted, has_aux=True)(start)
    return grads, loss, metrics


def stores_plainly(leaves: list[torch.Tensor], grads: list[torch.Tensor]) -> bool:
    """Whether autograd's backward would do nothing with ``grads`` but store them in (or add them to)
    ``.grad`` of ``leaves``: plain leaf tensors that require grad, with no gradient hooks, gradients
    of their shape, dtype and device, and any existing ``.grad`` a dense tensor of their dtype."""
    for p, g in zip(leaves, grads, strict=True):
        if type(p) not in (torch.nn.Parameter, torch.Tensor) or not (p.is_leaf and p.requires_grad):
            return False
        if p._backward_hooks or getattr(p, "_post_accumulate_grad_hooks", None):
            return False
        if g.shape != p.shape or g.dtype != p.dtype or g.device != p.device:
            return False
        if p.grad is not None and (p.grad.layout != torch.strided or p.grad.dtype != p.dtype):
            return False
    return True


def _equal_weights(start: dict[str, torch.Tensor], parts: list[torch.Tensor]) -> torch.Tensor:
    """Weight 1 for every task of the chunk, in the losses' (upcast) dtype."""
    dtype = torch.promote_types(next(iter(start.values())).dtype, torch.float32)
    return torch.ones(len(parts[0]), dtype=dtype, device=parts[0].device)


def _detached(start: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: t.detach() for n, t in start.items()}


def _scaled(grads: list[torch.Tensor], weight: torch.Tensor) -> list[torch.Tensor]:
    """Every gradient times the 0-dim ``weight`` (one foreach call when they share a dtype)."""
    if grads and all(g.dtype == grads[0].dtype for g in grads):
        return list(torch._foreach_mul(grads, weight.to(grads[0].dtype)))
    return [g * weight.to(g.dtype) for g in grads]


class _FusedMetaStep(torch.autograd.Function):
    """Per-task losses whose backward hands out a meta-gradient computed with them in the forward.

    ``run(None)`` gave the losses and the gradient of their sum (``grads``); a backward with equal
    weights on every task (every mean or sum of them) scales it, other weights run ``run(weights)``
    again from the random state ``rng`` the first run started from.
    """

    @staticmethod
    def forward(fctx: Any, run: Any, rng: Any, loss: torch.Tensor, grads: list[torch.Tensor], *start: torch.Tensor):  # type: ignore[no-untyped-def, override]
        fctx.run, fctx.rng, fctx.grads = run, rng, grads
        return loss.clone()

    @staticmethod
    @once_differentiable
    def backward(fctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        first = grad_loss.reshape(-1)[:1]
        # a sum or mean hands back one value expanded (stride 0): equal weights without comparing
        if grad_loss.stride() == (0,) or torch.equal(grad_loss, first.expand_as(grad_loss)):
            return (None, None, None, None, *_scaled(fctx.grads, first.reshape(())))
        with replaying_random(fctx.rng), torch.enable_grad():  # as the forward ran
            _, _, weighted = fctx.run(grad_loss)
        return (None, None, None, None, *weighted)


def probe_fusable(
    engine: CompileEngine,
    ctx: EngineContext,
    batch: Batch,
    start: dict[str, torch.Tensor],
    parts: list[torch.Tensor],
    finite: Any,
) -> tuple[bool, str]:
    """Whether the chunk's meta-gradient can be computed in one graph: every meta-parameter it
    reads must come in through ``start``.  Run once, uncompiled, on the first training chunk: a
    hook or model that reads any other tensor requiring grad (a plugin's own parameters, parameters
    that are not adapted, data that requires grad) leaves outputs that still require grad."""
    try:
        with finite_suspended(finite), replaying_random(random_state()), torch.enable_grad():
            grads, loss, _ = fused_meta_gradient(
                engine, ctx, batch, _detached(start), parts, _equal_weights(start, parts)
            )
    except Exception as exc:  # noqa: BLE001 - any failure means: keep the general path
        return False, f"meta-gradient compiled through autograd ({type(exc).__name__}: {str(exc).splitlines()[0]})"
    if loss.requires_grad or any(g.requires_grad for g in grads.values()):
        return False, (
            "meta-gradient compiled through autograd (the task body reads meta-parameters other than the adapted "
            "starting point, e.g. a plugin's own parameters)"
        )
    return True, "inner loops and outer backward compiled as one graph"


def _raised_while_traced(exc: BaseException) -> bool:
    """Whether dynamo stopped because the traced code itself raised (an "observed" exception)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, torch._dynamo.exc.ObservedException):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
