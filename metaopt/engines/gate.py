"""The compile engine's exactness gate: on the user's own model and first training batch, before the
first step, the compiled meta-gradient must be as close to an exact (float64) one as eager
arithmetic in the same dtype is.

At one place (the batch, or a dithered copy of it, below):

* references: the eager engine's meta-gradient with every meta-parameter, buffer and input in
  float64, at the place and at :data:`GATE_DRAWS` copies of it with every floating-point input
  multiplied by ``1 + eps * N(0, 1)`` (``eps`` of the model's dtype; seeded draws of the gate's
  own): the exact meta-gradient at the place and at inputs moved by rounding;
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
can judge decides.  A refusal at a place whose references agree, or at every place tried, raises
:class:`~metaopt.errors.ConfigError` naming the parameter with the largest difference and offering
``engine="vmap"`` / ``"loop"``.  Either way the verdict is logged and returned (the engine keeps it
as ``engine.gate``).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

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
#: rounding-level perturbations of a place's inputs at which the gate also takes float64
GATE_DRAWS = 3
#: places the gate may judge at: the batch, then copies of it with the inputs dithered by GATE_DITHER
GATE_PLACES = 3
GATE_DITHER = 1e-3


def rounding_perturbed(data: list[Any], eps: float, draw: int) -> list[Any]:
    """``data`` (tuples of tensors) with every floating-point entry multiplied by ``1 + eps * N(0, 1)``,
    from a generator seeded with ``draw`` (the global random state is not touched)."""
    g = torch.Generator().manual_seed(draw)

    def moved(t: torch.Tensor) -> torch.Tensor:
        noise = torch.randn(t.shape, generator=g, dtype=torch.float64).to(device=t.device, dtype=t.dtype)
        return t * (1 + eps * noise)

    return [tuple(moved(t) if t.is_floating_point() else t for t in task) for task in data]


def exactness_gate(engine: VmapEngine, batch: Batch, ctx: EngineContext) -> dict[str, Any]:
    """Judge ``engine``'s compiled meta-gradient on ``batch`` (see the module docstring); return the
    verdict of the place that judged, or raise :class:`ConfigError`.  ``engine`` is the compile engine
    (a :class:`VmapEngine` whose ``eager()`` runs its chunks uncompiled; not imported here, which would
    make an import circle)."""
    started = time.perf_counter()
    dtype = next(p for p in ctx.holder.parameters() if p.requires_grad).dtype
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
    gate["seconds"] = time.perf_counter() - started
    for verdict in tried:
        log.info(
            "engine='compile' exactness gate at %s: compiled meta-gradient %.3g from the nearest float64 reference "
            "(%s; eager %s: %.3g; bound %.3g; float64 moves by %.3g when the inputs move by rounding) -> %s",
            verdict["judged_at"],
            verdict["d_compiled"],
            verdict["nearest_reference"],
            gate["dtype"],
            verdict["d_eager"],
            verdict["tolerance"],
            verdict["float64_moves"],
            "trusted" if verdict["passed"] else "refused" if verdict is judged and can_judge else "cannot judge here",
        )
    if gate["passed"]:
        return gate
    moved = ", ".join(f"{v['float64_moves']:.3g}" for v in tried)
    where = (
        f"at {judged['judged_at']}, where float64 is smooth (it moves by {judged['float64_moves']:.3g} when the "
        "inputs move by rounding)"
        if can_judge
        else f"at every place tried ({len(tried)}: the batch and copies with its inputs dithered), each on a "
        f"discontinuity of the meta-gradient (float64 moves by {moved} "
        "when the inputs move by rounding)"
    )
    raise ConfigError(
        f"engine='compile' failed its exactness gate on the first batch: {where}, the compiled meta-gradient is "
        f"{judged['d_compiled']:.3g} (largest entry difference over the largest entry) from the nearest float64 "
        f"computation, eager {gate['dtype']} is {judged['d_eager']:.3g} from it, and the bound is "
        f"{judged['tolerance']:.3g}; the largest difference is in {judged['largest_difference_in']!r}. Compilation "
        "reorders floating-point operations (and random draws inside a task, such as dropout, differ if the "
        "compiled code draws other numbers than eager code). Use "
        "engine='vmap' (the same computation uncompiled) or engine='loop'."
    )


def decides(verdict: dict[str, Any]) -> bool:
    """Whether a place's verdict stands: a pass, or a refusal where the float64 references agree to
    within the bound (elsewhere the result may lie on a side of a discontinuity no draw reached)."""
    return verdict["passed"] or verdict["float64_moves"] <= verdict["tolerance"]


def judge(engine: VmapEngine, batch: Batch, ctx: EngineContext, data: list[Any]) -> dict[str, Any]:
    """The compiled and eager meta-gradients at ``data`` measured from the nearest float64 reference
    there; ``passed`` when the compiled one is within the bound."""
    holder = ctx.holder
    named = [(n, p) for n, p in holder.named_parameters() if p.requires_grad]
    dtype = named[0][1].dtype

    def meta_gradient(compiled: bool, data: list[Any]) -> list[torch.Tensor]:
        probe = Batch(learner=batch.learner, data=data, training=True, runner=batch.runner)
        with torch.random.fork_rng(), torch.enable_grad():
            torch.manual_seed(0)
            if compiled:
                loss = VmapEngine.run(engine, probe, ctx, stacks=True)
            else:
                with engine.eager():  # type: ignore[attr-defined]
                    loss = VmapEngine.run(engine, probe, ctx, stacks=True)
            grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
        return [torch.zeros_like(p) if g is None else g.detach() for (_, p), g in zip(named, grads, strict=True)]

    eager = meta_gradient(False, data)
    compiled = meta_gradient(True, data)
    eps = torch.finfo(dtype).eps
    # (distance, parameter, reference index) of the nearest reference so far; references are dropped once
    # measured, so four gradients are held at a time, not 2 + 1 + GATE_DRAWS
    near: dict[str, tuple[float, str, int]] = {}
    moves = 0.0
    if dtype != torch.float64:
        holder.to(torch.float64)
    try:
        wide = [tuple(t.double() if t.is_floating_point() else t for t in task) for task in data]
        at_place = eager if dtype == torch.float64 else meta_gradient(False, wide)
        scale = max(float(g.abs().max()) for g in at_place) or 1.0

        def distance(grads: list[torch.Tensor], reference: list[torch.Tensor]) -> tuple[float, str]:
            per = [float((g.double() - r).abs().max()) / scale for g, r in zip(grads, reference, strict=True)]
            worst = max(range(len(per)), key=per.__getitem__)
            return per[worst], named[worst][0]

        def measure(reference: list[torch.Tensor], index: int) -> None:
            for name, grads in (("eager", eager), ("compiled", compiled)):
                measured = (*distance(grads, reference), index)
                if name not in near or measured < near[name]:
                    near[name] = measured

        measure(at_place, 0)
        for draw in range(GATE_DRAWS):
            reference = meta_gradient(False, rounding_perturbed(wide, eps, draw))
            moves = max(moves, distance(reference, at_place)[0])
            measure(reference, draw + 1)
            del reference
    finally:
        holder.to(dtype)
    d_compiled, worst, matched = near["compiled"]
    tolerance = max(GATE_FACTOR * near["eager"][0], GATE_FLOOR.get(dtype, GATE_FLOOR_EPS * eps))
    return {
        "passed": d_compiled <= tolerance,
        "d_eager": near["eager"][0],
        "d_compiled": d_compiled,
        "tolerance": tolerance,
        "float64_moves": moves,
        "nearest_reference": "float64 there"
        if matched == 0
        else f"float64 with the inputs moved by rounding, draw {matched}",
        "largest_difference_in": worst,
    }
