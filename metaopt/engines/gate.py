"""The compile engine's exactness gate: on the user's own model and first training batch, before the
first step, the compiled meta-gradient must be as close to an exact (float64) one as eager
arithmetic in the same dtype is.

At one place (the batch, or a dithered copy of it, below):

* references: the eager engine's meta-gradient with every meta-parameter, buffer and input in
  float64, at the place and at :data:`GATE_DRAWS` draws of float32's rounding there: every
  floating-point input, and every floating-point result of a torch function while the batch runs (the
  task bodies and the meta-loss), multiplied by ``1 + eps * N(0, 1)`` (``eps`` of the model's dtype;
  seeded draws of the gate's own, in antithetic pairs): the standard model of floating-point
  arithmetic, ``fl(a op b) = (a op b)(1 + delta)``, one rounding per input and per result
  (:class:`RoundingMode`);
* ``d(g)``: the distance of ``g`` from the nearest reference, as the largest entry difference over
  the largest entry of the float64 meta-gradient at the place; ``float64_moves``: how far the
  references at the draws are from the one at the place;
* accepted when ``d(compiled) <= max(4 * d(eager), floor)``; the floor is ``4 * eps`` of the dtype
  (float32: 4.8e-7), and 1e-10 for a float64 model, whose eager result is the reference itself.

Where the meta-gradient is smooth, the references agree to about ``eps`` and this is a comparison
with float64 at full resolution.  Where the place sits on a discontinuity (a max-pool near-tie or a
ReLU kink that rounding flips), they differ by O(1), and any float32 computation, eager or
compiled, may land on either side; measuring from the nearest reference holds a result on the far
side to the same bound as one on the near side.  A place where the compiled result is refused and
the references disagree by more than the bound cannot judge (the result may lie on a side no draw
reached): the gate moves on to a copy of the batch with its inputs multiplied by
``1 + GATE_DITHER * N(0, 1)``, up to :data:`GATE_PLACES` places in all, and the first place that
can judge decides.

Where no place can judge (the model's meta-gradient is rough at its dtype's rounding everywhere the
gate looked, as conv4 with 5 inner steps is in float32), float32 cannot tell worse compiled
arithmetic from a kink, and the gate judges what it can at full resolution: the compiled code itself,
run in float64 on the batch, must equal the eager float64 meta-gradient to 1e-10, and the compiled
result in the model's dtype must be no farther from its nearest reference than rounding moves
float64 at every place tried (``judged_at`` says so; logged as a warning).

A refusal raises :class:`~metaopt.errors.ConfigError` naming the parameter with the largest
difference and offering ``engine="vmap"`` / ``"loop"``.  Either way the verdict is logged and
returned (the engine keeps it as ``engine.gate``).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from metaopt.engines.base import EngineContext
from metaopt.engines.vmap import VmapEngine
from metaopt.errors import ConfigError
from metaopt.task import Batch

log = logging.getLogger("metaopt.engines")
#: the gate's bound on the compiled result's distance from float64, in units of the eager one's
GATE_FACTOR = 4.0
#: the bound's floor: float64 models are held to the project's float64 agreement (their eager result
#: is the reference itself), lower precisions to a few machine epsilons
GATE_FLOOR = {torch.float64: 1e-10}
GATE_FLOOR_EPS = 4.0
#: draws of the dtype's rounding (of the inputs and of every result in the task body) at which the gate
#: also takes float64; antithetic pairs (draw 2k + 1 is draw 2k negated), so a kink that rounding moves
#: to first order is reached on both sides by every pair
GATE_DRAWS = 4
#: places the gate may judge at: the batch, then copies of it with the inputs dithered by GATE_DITHER
GATE_PLACES = 3
GATE_DITHER = 1e-3

Gradient = list[torch.Tensor]


def rounding_perturbed(data: list[Any], eps: float, draw: int, sign: float = 1.0) -> list[Any]:
    """``data`` (tuples of tensors) with every floating-point entry multiplied by ``1 + sign * eps * N(0, 1)``,
    from a generator seeded with ``draw`` (the global random state is not touched)."""
    g = torch.Generator().manual_seed(draw)

    def moved(t: torch.Tensor) -> torch.Tensor:
        noise = torch.randn(t.shape, generator=g, dtype=torch.float64).to(device=t.device, dtype=t.dtype)
        return t * (1 + sign * eps * noise)

    return [tuple(moved(t) if t.is_floating_point() else t for t in task) for task in data]


_DATA_MOVEMENT = """__get__ __getitem__ cat chunk clone concat concatenate contiguous detach expand expand_as
    flatten flip gather index_select masked_fill movedim narrow pad permute repeat repeat_interleave reshape roll
    select split squeeze stack t transpose unbind unflatten unsqueeze view view_as where"""
_SELECTION = """__neg__ abs adaptive_max_pool1d adaptive_max_pool2d adaptive_max_pool3d amax amin ceil clamp floor
    hardtanh max max_pool1d max_pool2d max_pool3d maximum min minimum neg relu round sign trunc"""
_CONSTANTS = """arange empty empty_like eye full full_like new_full new_ones new_tensor new_zeros ones ones_like
    tensor zeros zeros_like"""
#: torch functions whose floating-point results are exact, not rounded: data movement and views,
#: selection, sign and rounding to integers, and constants (inputs, not results)
EXACT_FUNCTIONS = frozenset(f"{_DATA_MOVEMENT} {_SELECTION} {_CONSTANTS}".split())


class RoundingMode(TorchFunctionMode):
    """While active, every floating-point tensor that a torch function returns is multiplied by
    ``1 + sign * eps * N(0, 1)`` (a generator seeded with ``draw``; the global random state is untouched):
    one rounding per result, ``fl(a op b) = (a op b)(1 + delta)``.  Results that floating point computes
    exactly (:data:`EXACT_FUNCTIONS`: copies, views, selections such as ReLU and max-pooling, rounding to
    integers, constants), in-place functions (names ending in ``_``) and non-tensor results are left
    alone.  Inside ``torch.func`` transforms the noise is drawn outside them (one draw per call, shared
    by the tasks of a vmapped call)."""

    def __init__(self, eps: float, draw: int, sign: float = 1.0) -> None:
        super().__init__()
        self.eps = sign * eps
        self.generator = torch.Generator().manual_seed(draw)

    def __torch_function__(self, func: Callable[..., Any], types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", "_")
        if not isinstance(out, torch.Tensor) or not out.is_floating_point() or name.endswith("_"):
            return out
        if name in EXACT_FUNCTIONS or (name == "to" and out.dtype == torch.float64):  # widening is exact
            return out
        with torch._C._DisableFuncTorch():  # a plain tensor of the (per-task) shape, even under vmap
            noise = torch.randn(out.shape, generator=self.generator, dtype=torch.float64)
        return out * (1 + self.eps * noise.to(device=out.device, dtype=out.dtype))


def model_dtype(ctx: EngineContext) -> torch.dtype:
    """The dtype the model trains in: that of its first trainable parameter."""
    return next(p for p in ctx.holder.parameters() if p.requires_grad).dtype


def exactness_gate(engine: VmapEngine, batch: Batch, ctx: EngineContext) -> dict[str, Any]:
    """Judge ``engine``'s compiled meta-gradient on ``batch`` (see the module docstring); return the
    verdict of the place that judged, or raise :class:`ConfigError`.  ``engine`` is the compile engine
    (a :class:`VmapEngine` whose ``eager()`` runs its chunks uncompiled and whose ``gate_graphs()``
    counts its compilations apart; not imported here, which would make an import circle)."""
    started = time.perf_counter()
    dtype = model_dtype(ctx)
    tried: list[dict[str, Any]] = []
    for place in range(GATE_PLACES):
        data = batch.data if place == 0 else rounding_perturbed(batch.data, GATE_DITHER, 1000 + place)
        verdict = judge(engine, batch, ctx, data)
        verdict["judged_at"] = (
            "the batch" if place == 0 else f"the batch's inputs x (1 + {GATE_DITHER:g} N(0,1)), copy {place}"
        )
        tried.append(verdict)
        if decides(verdict):
            break
    judged = tried[-1]
    can_judge = decides(judged)
    gate = {**judged, "places_tried": len(tried), "dtype": str(dtype).removeprefix("torch.")}
    # every place's numbers, the deciding one's included (the log's lines, for records)
    keys = ("judged_at", "d_compiled", "d_eager", "tolerance", "float64_moves", "nearest_reference")
    gate["places"] = [{k: v[k] for k in keys} for v in tried]
    for verdict in tried:
        log.info(
            "engine='compile' exactness gate at %s: compiled meta-gradient %.3g from the nearest float64 reference "
            "(%s; eager %s: %.3g; bound %.3g; float64 moves by %.3g under rounding) -> %s",
            verdict["judged_at"],
            verdict["d_compiled"],
            verdict["nearest_reference"],
            gate["dtype"],
            verdict["d_eager"],
            verdict["tolerance"],
            verdict["float64_moves"],
            "trusted" if verdict["passed"] else "refused" if verdict is judged and can_judge else "cannot judge here",
        )
    if not gate["passed"] and not can_judge and dtype != torch.float64:
        gate.update(judge_rough(engine, batch, ctx, tried))
    gate["seconds"] = time.perf_counter() - started
    if gate["passed"]:
        return gate
    moved = ", ".join(f"{v['float64_moves']:.3g}" for v in tried)
    if can_judge:
        where = (
            f"at {judged['judged_at']}, where float64 is smooth (it moves by {judged['float64_moves']:.3g} under "
            "rounding)"
        )
    elif "float64_compiled" in gate:
        where = (
            f"at every place tried ({len(tried)}: the batch and copies with its inputs dithered), each on a "
            f"discontinuity of the meta-gradient (float64 moves by {moved} under rounding), so the compiled code "
            f"was run in float64: {gate['rough_reason']}"
        )
    else:
        where = (
            f"at every place tried ({len(tried)}: the batch and copies with its inputs dithered), each on a "
            f"discontinuity of the meta-gradient (float64 moves by {moved} under rounding)"
        )
    raise ConfigError(
        f"engine='compile' failed its exactness gate on the first batch: {where}, the compiled meta-gradient is "
        f"{judged['d_compiled']:.3g} (largest entry difference over the largest entry) from the nearest float64 "
        f"computation, eager {gate['dtype']} is {judged['d_eager']:.3g} from it, and the bound is "
        f"{judged['tolerance']:.3g}; the largest difference is in {gate['largest_difference_in']!r}. Compilation "
        "reorders floating-point operations (and random draws inside a task, such as dropout, differ if the "
        "compiled code draws other numbers than eager code). Use "
        "engine='vmap' (the same computation uncompiled) or engine='loop'."
    )


def decides(verdict: dict[str, Any]) -> bool:
    """Whether a place's verdict stands: a pass, or a refusal where the float64 references agree to
    within the bound (elsewhere the result may lie on a side of a discontinuity no draw reached)."""
    return verdict["passed"] or verdict["float64_moves"] <= verdict["tolerance"]


def meta_gradient(
    engine: VmapEngine,
    batch: Batch,
    ctx: EngineContext,
    data: list[Any],
    compiled: bool,
    rounding: RoundingMode | None = None,
) -> Gradient:
    """The meta-gradient of ``data`` (the learner's parameters and ``data`` in whatever dtype they are
    now), compiled or eager, with ``rounding`` active in the task body when given."""
    probe = Batch(learner=batch.learner, data=data, training=True, runner=batch.runner)
    named = [p for p in ctx.holder.parameters() if p.requires_grad]
    with torch.random.fork_rng(), torch.enable_grad():
        torch.manual_seed(0)
        if compiled:
            loss = VmapEngine.run(engine, probe, ctx, stacks=True)
        else:
            with engine.eager(), rounding or contextlib.nullcontext():  # type: ignore[attr-defined]
                loss = VmapEngine.run(engine, probe, ctx, stacks=True)
        grads = torch.autograd.grad(loss, named, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(named, grads, strict=True)]


@contextlib.contextmanager
def in_float64(ctx: EngineContext, data: list[Any]) -> Iterator[list[Any]]:
    """The learner converted to float64 in place (and back: a float32 round trip is exact), and ``data``'s
    floating-point tensors in float64."""
    dtype = model_dtype(ctx)
    if dtype != torch.float64:
        ctx.holder.to(torch.float64)
    try:
        yield [tuple(t.double() if t.is_floating_point() else t for t in task) for task in data]
    finally:
        ctx.holder.to(dtype)


def distance_fn(ctx: EngineContext, reference: Gradient) -> Callable[[Gradient, Gradient], tuple[float, str]]:
    """``distance(g, r)``: the largest entry difference over the largest entry of ``reference``, and the
    parameter it is in."""
    names = [n for n, p in ctx.holder.named_parameters() if p.requires_grad]
    scale = max(float(g.abs().max()) for g in reference) or 1.0

    def distance(grads: Gradient, other: Gradient) -> tuple[float, str]:
        per = [float((g.double() - r.double()).abs().max()) / scale for g, r in zip(grads, other, strict=True)]
        worst = max(range(len(per)), key=per.__getitem__)
        return per[worst], names[worst]

    return distance


def judge(engine: VmapEngine, batch: Batch, ctx: EngineContext, data: list[Any]) -> dict[str, Any]:
    """The compiled and eager meta-gradients at ``data`` measured from the nearest float64 reference
    there; ``passed`` when the compiled one is within the bound."""
    dtype = model_dtype(ctx)
    eager = meta_gradient(engine, batch, ctx, data, compiled=False)
    compiled = meta_gradient(engine, batch, ctx, data, compiled=True)
    eps = torch.finfo(dtype).eps
    # (distance, parameter, reference index) of the nearest reference so far; references are dropped once
    # measured, so four gradients are held at a time, not 3 + GATE_DRAWS
    near: dict[str, tuple[float, str, int]] = {}
    moves = 0.0
    with in_float64(ctx, data) as wide:
        at_place = eager if dtype == torch.float64 else meta_gradient(engine, batch, ctx, wide, compiled=False)
        distance = distance_fn(ctx, at_place)

        def measure(reference: Gradient, index: int) -> None:
            for name, grads in (("eager", eager), ("compiled", compiled)):
                measured = (*distance(grads, reference), index)
                if name not in near or measured < near[name]:
                    near[name] = measured

        measure(at_place, 0)
        for draw in range(GATE_DRAWS):
            seed, sign = draw // 2, (-1.0) ** draw  # antithetic pairs
            moved = rounding_perturbed(wide, eps, seed, sign)
            rounding = RoundingMode(eps, seed, sign)
            reference = meta_gradient(engine, batch, ctx, moved, compiled=False, rounding=rounding)
            moves = max(moves, distance(reference, at_place)[0])
            measure(reference, draw + 1)
            del reference
    d_compiled, worst, matched = near["compiled"]
    tolerance = max(GATE_FACTOR * near["eager"][0], GATE_FLOOR.get(dtype, GATE_FLOOR_EPS * eps))
    return {
        "passed": d_compiled <= tolerance,
        "d_eager": near["eager"][0],
        "d_compiled": d_compiled,
        "tolerance": tolerance,
        "float64_moves": moves,
        "nearest_reference": "float64 there" if matched == 0 else f"float64 under rounding, draw {matched}",
        "largest_difference_in": worst,
    }


def judge_rough(engine: VmapEngine, batch: Batch, ctx: EngineContext, tried: list[dict[str, Any]]) -> dict[str, Any]:
    """Where no place can judge in the model's dtype: the compiled code run in float64 on the batch
    against the eager float64 meta-gradient (full resolution), and the compiled result within float64's
    movement under rounding at every place tried.  The verdict's fields, to update the gate's."""
    with in_float64(ctx, batch.data) as wide:
        exact = meta_gradient(engine, batch, ctx, wide, compiled=False)
        with engine.gate_graphs():  # type: ignore[attr-defined]
            compiled = meta_gradient(engine, batch, ctx, wide, compiled=True)
        d64, worst = distance_fn(ctx, exact)(compiled, exact)
    floor = GATE_FLOOR[torch.float64]
    beyond = [v for v in tried if v["d_compiled"] > v["float64_moves"]]
    passed = d64 <= floor and not beyond
    if d64 > floor:
        reason = (
            f"in float64 it is {d64:.3g} from the eager float64 meta-gradient (bound {floor:g}; largest difference "
            f"in {worst!r}): the compiled code computes another function"
        )
    elif beyond:
        reason = (
            f"it equals eager in float64 ({d64:.3g}), but in the model's dtype it is farther"
            f" from float64 at {beyond[0]['judged_at']} ({beyond[0]['d_compiled']:.3g}) than rounding "
            f"moves float64 there ({beyond[0]['float64_moves']:.3g})"
        )
    else:
        reason = ""
    verdict = {
        "passed": passed,
        "float64_compiled": d64,
        "judged_at": "the compiled code in float64 at the batch (the meta-gradient is rough at rounding level "
        f"at every place tried: float64 moves by {max(v['float64_moves'] for v in tried):.3g})",
        "rough_reason": reason,
    }
    if d64 > floor:
        verdict["largest_difference_in"] = worst
    level = logging.WARNING if passed else logging.INFO
    log.log(
        level,
        "engine='compile' exactness gate: the meta-gradient is rough at rounding level at every place tried (float64 "
        "moves by %s), so float32 cannot tell compiled arithmetic from a kink; the compiled code in float64 is %.3g "
        "from eager float64 (bound %g), and compiled float32 is within float64's movement at %d of %d places -> %s",
        ", ".join(f"{v['float64_moves']:.3g}" for v in tried),
        d64,
        floor,
        len(tried) - len(beyond),
        len(tried),
        "trusted" if passed else "refused",
    )
    return verdict
