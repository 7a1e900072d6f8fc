"""How far a workload's float64 meta-gradient moves when its inputs move by float32's rounding.

``python benchmarks/sensitivity.py --workload 'conv4 28px 5w1s, mb 8, K=1'``: the hand torch.func
loop's MAML meta-gradient on the speed harness's first batch (``workloads.make_batches``), in float64,
at the batch as drawn and with every input entry multiplied by ``1 + eps * N(0, 1)`` (eps 1e-7 and
1e-6: float32's relative rounding), and in float32 at the batch as drawn. Each distance is the
largest entry difference over the largest entry of the float64 meta-gradient (the speed harness's
measure, and the compile engine's exactness gate's).

A well-conditioned meta-gradient moves by about eps. One that moves by O(1) is discontinuous at this
batch (a ReLU kink or a max-pool near-tie that rounding flips): there any reordering of floating-point
operations, a compiled kernel's included, may land on either side, and which side eager float32 lands
on is a matter of the machine's kernels (docs/engines.md, "The exactness gate on conv4").

``--engines``: instead, metaopt's eager vmap engine and its compile engine in float32 against the vmap
engine in float64, on the harness's first ``--batches`` batches and on the first batch with its
inputs multiplied by ``1 + 1e-3 N(0, 1)`` (two draws): how far each float32 engine lands from the
exact meta-gradient batch by batch. The compile engine's exactness gate is bypassed in this
diagnosis (it is what the gate's verdict is about); nothing else is changed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from metaopt.engines.gate import rounding_perturbed

sys.path.insert(0, str(Path(__file__).parent))
from contenders import CONTENDERS  # noqa: E402
from workloads import WORKLOADS, loss_of, make_batches, make_model  # noqa: E402


def meta_gradient(workload: str, tasks: list, dtype: torch.dtype) -> torch.Tensor:
    """The hand torch.func loop's meta-gradient of ``tasks`` in ``dtype``, flattened to float64."""
    wl = WORKLOADS.get(workload)
    model = make_model(wl["model"]).to(dtype)
    tasks = [tuple(t.to(dtype) if t.is_floating_point() else t for t in task) for task in tasks]
    CONTENDERS.get("torch.func").build(model, wl["steps"], wl["lr"], loss_of(wl["model"])).step(tasks)
    return torch.cat([p.grad.double().reshape(-1) for p in model.parameters() if p.grad is not None])


def sensitivity(workload: str, epsilons: tuple[float, ...] = (1e-7, 1e-6), seed: int = 5) -> list[str]:
    wl = WORKLOADS.get(workload)
    tasks = [
        tuple(t.double() if t.is_floating_point() else t for t in task)
        for task in make_batches(wl["model"], wl["meta_batch"], 1)[0]
    ]
    reference = meta_gradient(workload, tasks, torch.float64)
    scale = float(reference.abs().max())

    def distance(g: torch.Tensor) -> float:
        return float((g - reference).abs().max()) / scale

    rows = [f"{workload}: float32 at the batch as drawn: {distance(meta_gradient(workload, tasks, torch.float32)):.3g}"]
    for eps in epsilons:
        moved = distance(meta_gradient(workload, rounding_perturbed(tasks, eps, seed), torch.float64))
        rows.append(f"{workload}: float64, inputs x (1 + {eps:g} N(0,1)), seed {seed}: {moved:.3g}")
    return rows


def engines_across_batches(workload: str, batches: int = 3, backend: str = "inductor") -> list[str]:
    """float32 vmap and compile engines' distances from the float64 vmap engine, batch by batch."""
    import metaopt.engines.compile as compile_engine
    from metaopt import MetaLearner

    wl = WORKLOADS.get(workload)
    compile_engine.COMPILE_BACKEND = backend
    compile_engine.exactness_gate = lambda engine, batch, ctx: {"passed": True, "bypassed": True}

    def build(engine: str, dtype: torch.dtype) -> MetaLearner:
        torch.manual_seed(0)
        model = make_model(wl["model"]).to(dtype)
        return MetaLearner(
            model, inner_steps=wl["steps"], inner_lr=wl["lr"], loss_fn=loss_of(wl["model"]), engine=engine
        )

    def gradient(learner: MetaLearner, tasks: list, dtype: torch.dtype) -> torch.Tensor:
        for p in learner.parameters():
            p.grad = None
        learner.backward([tuple(t.to(dtype) if t.is_floating_point() else t for t in task) for task in tasks])
        return torch.cat(
            [torch.zeros_like(p).flatten() if p.grad is None else p.grad.flatten() for p in learner.parameters()]
        )

    learners = {"vmap": build("vmap", torch.float32), "compile": build("compile", torch.float32)}
    wide = build("vmap", torch.float64)
    drawn = make_batches(wl["model"], wl["meta_batch"], batches)
    cases = [(f"batch {i}", tasks) for i, tasks in enumerate(drawn)]
    cases += [
        (f"batch 0, inputs x (1 + 1e-3 N(0,1)), seed {seed}", rounding_perturbed(drawn[0], 1e-3, seed))
        for seed in (1, 2)
    ]
    rows = []
    for name, tasks in cases:
        tasks = [tuple(t.float() if t.is_floating_point() else t for t in task) for task in tasks]
        reference = gradient(wide, tasks, torch.float64)
        scale = float(reference.abs().max())
        d = {
            e: float((gradient(learner, tasks, torch.float32).double() - reference).abs().max()) / scale
            for e, learner in learners.items()
        }
        rows.append(
            f"{workload}: {name}: float32 vmap {d['vmap']:.3g}, float32 compile (gate bypassed) {d['compile']:.3g}"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default="conv4 28px 5w1s, mb 8, K=1", choices=WORKLOADS.names())
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument(
        "--engines", action="store_true", help="metaopt's float32 vmap and compile engines, batch by batch"
    )
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--backend", default="inductor", help="torch.compile backend for --engines")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.engines:
        print("\n".join(engines_across_batches(args.workload, args.batches, args.backend)))
    else:
        print("\n".join(sensitivity(args.workload, seed=args.seed)))


if __name__ == "__main__":
    main()
