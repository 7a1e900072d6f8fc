"""The cost of entering metaopt.norms.SafeNorms for a model with no normalisation at all.

The vmap engine enters the decomposition for every model (a model may call ``F.layer_norm``
itself); on the overhead-bound sinusoid MLP it costs one Python dispatch per torch call.
Interleaved rounds in one process, one thread:  python benchmarks/safe_norms_cost.py
"""

from __future__ import annotations

import time

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


if __name__ == "__main__":
    torch.set_num_threads(1)
    times = {safe: [] for safe in (False, True)}
    for _ in range(2):
        for safe in (False, True):
            times[safe].append(time_per_iteration(safe))
    off, on = min(times[False]), min(times[True])
    print(
        f"sinusoid MLP, mb 25, K=1: without SafeNorms {off * 1e3:.2f} ms, with {on * 1e3:.2f} ms, ratio {on / off:.3f}"
    )
