"""Two small costs metaopt pays for safety, measured in one process (one thread).

``python benchmarks/overheads.py safe-norms``: the vmap engine's norm routing (metaopt.norms) for a
model with no normalisation at all (the engine routes for every model, since a model may call
``F.layer_norm`` itself), on the overhead-bound sinusoid MLP: engine.safe_norms on against off,
after the first batch (whose audit mode costs one Python dispatch per torch call).

``python benchmarks/overheads.py vmap``: metaopt's vmap engine (default, and without the finite check)
against the hand-written vmap loop of the speed harness (benchmarks/contenders.py), sinusoid MLP,
meta-batch 25, K=1 and K=5: process CPU time per meta-iteration (less exposed than the wall clock
to another process on the other core), in many short interleaved rounds; the ratio is the median over
rounds of each round's metaopt time over the hand loop's (paired, so a slow spell cancels out).

``python benchmarks/overheads.py compile``: where metaopt's compiled step (engine="compile", the
meta-gradient inside the graph) spends its time, sinusoid MLP, meta-batch 25, K=1: process CPU time
per meta-iteration and per section (each timed by a wrapper; sections nest), the compiled call with
dynamo's guard evaluation skipped (a measurement only), and the hand-written one-graph step and
eager vmap steps of the speed harness beside it.

``python benchmarks/overheads.py cpp-wrapper``: engine="compile" with inductor's C++ wrapper on and
off (metaopt.engines.compile.CPP_WRAPPER), sinusoid MLP, meta-batch 25, K=1, in one process:
first calls, then process CPU time per step over interleaved rounds.

``python benchmarks/overheads.py checksum``: the checkpoint checksum (metaopt.rundir.checksum)
of a timm resnet10t and resnet18 state with Adam-like moments, beside ``torch.save`` of it.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import metaopt
from metaopt.data import SinusoidTasks
from metaopt.models import mlp


def time_per_iteration(safe: bool, iters: int = 40, rounds: int = 5) -> float:
    torch.manual_seed(0)
    learner = metaopt.MetaLearner(mlp(), inner_steps=1, inner_lr=0.01, loss_fn=F.mse_loss, engine="vmap")
    sampler = SinusoidTasks(seed=0)
    batch = [sampler.sample_task() for _ in range(25)]
    learner.backward(batch)  # builds the engine
    learner.engines["vmap"].safe_norms = safe
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(iters):
            learner.backward(batch)
        best = min(best, (time.perf_counter() - start) / iters)
    return best


def safe_norms(iters: int = 40, rounds: int = 5) -> str:
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(2):
        for safe in (False, True):
            times[safe].append(time_per_iteration(safe, iters, rounds))
    off, on = min(times[False]), min(times[True])
    return (
        f"sinusoid MLP, mb 25, K=1: without SafeNorms {off * 1e3:.2f} ms, with {on * 1e3:.2f} ms, ratio {on / off:.3f}"
    )


def vmap_overhead(steps: tuple[int, ...] = (1, 5), iters: int = 2, rounds: int = 300) -> list[str]:
    """Per round, every contender runs ``iters`` steps (order reversed on odd rounds), so a slow spell of
    the machine falls on all of them alike; each round gives each metaopt contender's time over the hand
    loop's in that round, and the median of those paired ratios is the row's ratio (with its quartiles)."""
    import statistics
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from contenders import CONTENDERS

    names = ["metaopt maml (vmap)", "metaopt maml (vmap, check_finite=False)", "hand vmap"]
    tasks = [tuple(t.float() for t in task) for task in SinusoidTasks(shots=10, seed=0).sample(25)]
    rows = []
    for k in steps:
        built = {}
        for name in names:
            torch.manual_seed(0)
            model = mlp()
            built[name] = (model, CONTENDERS.get(name).build(model, k, 0.01, F.mse_loss).step)
        for model, step in built.values():
            for _ in range(20):
                step(tasks)
                model.zero_grad()
        times: dict[str, list[float]] = {name: [] for name in names}
        for r in range(rounds):
            for name in names if r % 2 else names[::-1]:
                model, step = built[name]
                start = time.process_time()
                for _ in range(iters):
                    step(tasks)
                    model.zero_grad()
                times[name].append((time.process_time() - start) / iters)
        hand = times["hand vmap"]
        for name in names[:-1]:
            ratios = [a / b for a, b in zip(times[name], hand, strict=True)]
            low, mid, high = statistics.quantiles(ratios, n=4)
            rows.append(
                f"K={k} {name}: {mid:.3f}x hand (paired ratio over {rounds} rounds of {iters} steps; quartiles "
                f"{low:.3f}-{high:.3f}); median step {statistics.median(times[name]) * 1e3:.3f} ms"
            )
        rows.append(f"K={k} hand vmap: median step {statistics.median(hand) * 1e3:.3f} ms")
    return rows


def compile_sections(k: int = 1, iters: int = 400) -> list[str]:
    import collections
    import functools
    import sys

    import metaopt.engines.compile as compile_engine
    from metaopt.learner import MetaLearner
    from metaopt.task import Batch

    sys.path.insert(0, str(Path(__file__).parent))
    from contenders import CONTENDERS

    tasks = [tuple(t.float() for t in task) for task in SinusoidTasks(shots=10, seed=0).sample(25)]

    def per_step(step: Any, model: torch.nn.Module) -> float:
        for _ in range(20):
            step(tasks)
            model.zero_grad()
        start = time.process_time()
        for _ in range(iters):
            step(tasks)
            model.zero_grad()
        return (time.process_time() - start) / iters

    rows, steps = [], {}
    for name in ("metaopt maml (compile)", "metaopt maml (vmap)", "hand vmap (compiled meta-gradient)", "hand vmap"):
        torch.manual_seed(0)
        model = mlp()
        built = CONTENDERS.get(name).build(model, k, 0.01, F.mse_loss)
        steps[name] = (built, model)
        rows.append(f"K={k} {name}: {per_step(built.step, model) * 1e3:.3f} ms per step")
    built, model = steps["metaopt maml (compile)"]
    engine = built.learner.engines["compile"]
    spent: collections.Counter[str] = collections.Counter()
    patched = []

    def timed(owner: Any, attribute: str, label: str) -> None:
        original = getattr(owner, attribute)

        @functools.wraps(original)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.process_time()
            try:
                return original(*args, **kwargs)
            finally:
                spent[label] += time.process_time() - start

        setattr(owner, attribute, wrapper)
        patched.append((owner, attribute, original))

    timed(MetaLearner, "backward", "learner.backward (the whole step)")
    timed(MetaLearner, "run_tasks", "run_tasks (the engine's run)")
    timed(compile_engine.CompileEngine, "_chunk", "the chunk (the compiled call and the engine's work around it)")
    timed(engine, "_compiled_fused", "the compiled call")
    timed(compile_engine.CompileEngine, "_backward_chunk", "the meta-gradient into .grad")
    timed(Batch, "backward", "batch.backward (autograd hands out the stored meta-gradient)")
    try:
        total = per_step(built.step, model)
    finally:
        for owner, attribute, original in reversed(patched):
            setattr(owner, attribute, original)
    rows.append(f"K={k} metaopt maml (compile), sections timed: {total * 1e3:.3f} ms per step")
    rows += [f"  {label}: {seconds / (iters + 20) * 1e3:.3f} ms" for label, seconds in spent.items()]
    with_guards, skipped = [], []
    for _ in range(3):  # interleaved, min of each
        with_guards.append(per_step(built.step, model))
        with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
            skipped.append(per_step(built.step, model))
    rows.append(
        f"K={k} metaopt maml (compile): {min(with_guards) * 1e3:.3f} ms per step, with dynamo's guard evaluation "
        f"skipped {min(skipped) * 1e3:.3f} ms (min of 3 interleaved rounds)"
    )
    return rows


def cpp_wrapper_ab(k: int = 1, iters: int = 200, rounds: int = 8) -> list[str]:
    """engine="compile" with inductor's C++ wrapper (metaopt.engines.compile.CPP_WRAPPER) on and off,
    sinusoid MLP, meta-batch 25, in one process: each learner's first call (compilation included;
    the second to compile may reuse caches the first filled), then process CPU time per step over
    interleaved rounds, min and median of the rounds."""
    import statistics

    import metaopt.engines.compile as compile_engine

    tasks = [tuple(t.float() for t in task) for task in SinusoidTasks(shots=10, seed=0).sample(25)]
    built, rows = {}, []
    saved = compile_engine.CPP_WRAPPER
    try:
        for flag in (False, True):
            compile_engine.CPP_WRAPPER = flag
            torch.manual_seed(0)
            learner = metaopt.MetaLearner(mlp(), inner_steps=k, inner_lr=0.01, loss_fn=F.mse_loss, engine="compile")
            start = time.perf_counter()
            learner.backward(tasks)
            rows.append(f"K={k} cpp_wrapper={flag}: first call {time.perf_counter() - start:.1f} s")
            built[flag] = learner
    finally:
        compile_engine.CPP_WRAPPER = saved
    times: dict[bool, list[float]] = {False: [], True: []}
    for r in range(rounds):
        for flag in (False, True) if r % 2 else (True, False):
            learner = built[flag]
            start = time.process_time()
            for _ in range(iters):
                learner.backward(tasks)
                learner.zero_grad()
            times[flag].append((time.process_time() - start) / iters)
    for flag, values in times.items():
        rows.append(
            f"K={k} cpp_wrapper={flag}: min {min(values) * 1e3:.3f} ms, median {statistics.median(values) * 1e3:.3f} ms "
            f"per step ({rounds} interleaved rounds of {iters})"
        )
    return rows


def checksum_cost(models: tuple[str, ...] = ("resnet10t", "resnet18")) -> list[str]:
    import timm

    from metaopt.rundir import checksum

    rows = []
    for name in models:
        model = timm.create_model(name, num_classes=5)
        moments = {
            i: {"exp_avg": p.detach().clone(), "exp_avg_sq": p.detach().clone()}
            for i, p in enumerate(model.parameters())
        }
        state = {"learner": model.state_dict(), "optimizer": {"state": moments}}
        size = sum(t.numel() * t.element_size() for t in model.state_dict().values()) * 3
        start = time.perf_counter()
        checksum(state)
        digest = time.perf_counter() - start
        with tempfile.TemporaryDirectory() as folder:
            start = time.perf_counter()
            torch.save(state, Path(folder) / "state.pt")
            save = time.perf_counter() - start
        rows.append(
            f"{name}: {size / 2**20:.1f} MiB of tensors, checksum {digest * 1e3:.1f} ms, torch.save {save * 1e3:.1f} ms"
        )
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["safe-norms", "vmap", "compile", "cpp-wrapper", "checksum"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.what == "safe-norms":
        print(safe_norms())
    elif args.what == "compile":
        print("\n".join(compile_sections()))
    elif args.what == "cpp-wrapper":
        print("\n".join(cpp_wrapper_ab()))
    else:
        print("\n".join(vmap_overhead() if args.what == "vmap" else checksum_cost()))
