"""Sharpness of the support loss along the inner loop, for trained sinusoid runs.

Plain gradient descent at step α diverges on a quadratic once α·λ_max(H) > 2.  For each trained
run, on fresh K-shot tasks (float64, the run's final meta-parameters): the largest-magnitude
eigenvalue of the Hessian of the support MSE, by power iteration on Hessian-vector products
(double backward through ``torch.func.functional_call``, no metaopt code), at the meta-learned start and after each of S inner steps at α,
and the query MSE after the S steps.  The page asks whether the runs whose multi-step scores blow
up (docs/benchmarks/sinusoid_paper.md) start, or arrive, where α·λ_max > 2.

    python benchmarks/curvature.py RUN [RUN ...]      # adds the runs to docs/benchmarks/curvature.{md,json}
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import DOCS, device_name, shown, write_json  # noqa: E402

from metaopt.data import SinusoidTasks  # noqa: E402
from metaopt.trainer import load_run  # noqa: E402

Params = dict[str, torch.Tensor]


def top_eigenvalue(loss_of, params: Params, iters: int, generator: torch.Generator) -> float:
    """The Hessian eigenvalue of largest magnitude at ``params`` (signed), by power iteration."""
    leaves = {n: p.detach().requires_grad_() for n, p in params.items()}
    names = list(leaves)
    with torch.enable_grad():
        gradient = torch.autograd.grad(loss_of(leaves), [leaves[n] for n in names], create_graph=True)
    v = {n: torch.randn(p.shape, generator=generator, dtype=p.dtype) for n, p in params.items()}
    value = 0.0
    for _ in range(iters):
        norm = math.sqrt(sum(float((t * t).sum()) for t in v.values()))
        v = {n: t / norm for n, t in v.items()}
        dot = sum((g * v[n]).sum() for n, g in zip(names, gradient, strict=True))
        products = torch.autograd.grad(dot, [leaves[n] for n in names], retain_graph=True, allow_unused=True)
        hv = {n: torch.zeros_like(v[n]) if h is None else h for n, h in zip(names, products, strict=True)}
        value = sum(float((hv[n] * v[n]).sum()) for n in v)  # Rayleigh quotient of the unit vector
        v = hv
    return value


def task_sharpness(model, task, steps: int, lr: float, iters: int, seed: int) -> dict[str, Any]:
    """α·λ_max at the start and after each step, and the query MSE after ``steps`` steps."""
    sx, sy, qx, qy = (t.double() for t in task)

    def support(p: Params) -> torch.Tensor:
        return F.mse_loss(functional_call(model, p, (sx,)), sy)

    params = {n: p.detach().double() for n, p in model.named_parameters()}
    generator = torch.Generator().manual_seed(seed)
    sharp = []
    for k in range(steps + 1):
        sharp.append(lr * top_eigenvalue(support, params, iters, generator))
        if k == steps:
            break
        g = grad(support)(params)
        params = {n: params[n] - lr * g[n] for n in params}
    query = float(F.mse_loss(functional_call(model, params, (qx,)), qy))
    return {"alpha_lambda": sharp, "query_mse": query}


def measure(run: Path, tasks: int, shots: int, steps: int, lr: float, iters: int, seed: int) -> dict[str, Any]:
    _, learner = load_run(run)
    model = copy.deepcopy(learner.model).double().eval()
    start = time.perf_counter()
    sampled = SinusoidTasks(shots=shots, query=10, seed=seed).sample(tasks)
    rows = [task_sharpness(model, t, steps, lr, iters, seed + i) for i, t in enumerate(sampled)]
    return {
        "tasks": tasks,
        "shots": shots,
        "steps": steps,
        "lr": lr,
        "power_iters": iters,
        "seed": seed,
        "device": device_name(),
        "wall_s": round(time.perf_counter() - start, 1),
        "alpha_lambda_start": [r["alpha_lambda"][0] for r in rows],
        "alpha_lambda_max_along": [max(r["alpha_lambda"]) for r in rows],
        "query_mse": [r["query_mse"] for r in rows],
    }


def row(name: str, r: dict[str, Any]) -> str:
    start, along, mse = r["alpha_lambda_start"], r["alpha_lambda_max_along"], r["query_mse"]
    finite = [m for m in mse if math.isfinite(m)]
    blown = [i for i, m in enumerate(mse) if not math.isfinite(m) or m > 10]
    unstable = [i for i, a in enumerate(along) if a > 2]
    at_start = ", ".join(f"{start[i]:.2f}" for i in blown)
    cells = [
        name,
        f"{statistics.median(start):.2f} / {max(start):.2f}",
        f"{sum(a > 2 for a in start)} / {len(start)}",
        f"{len(unstable)} / {len(along)}",
        f"{statistics.median(finite):.3f}" if finite else "diverged",
        f"{len(blown)} / {len(mse)}" + (f" (their α·λ at the start: {at_start})" if blown else ""),
    ]
    return "| " + " | ".join(cells) + " |"


def write_report(results: dict[str, Any], docs: Path) -> None:
    first = next(iter(results.values()))
    lines = [
        "# Sharpness along the inner loop (sinusoid)",
        "",
        f"Per trained run: {first['tasks']} fresh tasks (seed {first['seed']}; shots as named), float64, the run's "
        f"final meta-parameters; α = {first['lr']}, {first['steps']} inner steps of plain gradient descent on the "
        f"support MSE. α·λ is α times the Hessian eigenvalue of largest magnitude of the support loss ({first['power_iters']} "
        "power iterations on Hessian-vector products); gradient descent is stable on a quadratic while α·λ < 2.",
        "A task blows up when its query MSE after the steps is above 10 (or not finite). Produced by "
        "`python benchmarks/curvature.py RUN ...` (runs of `benchmarks/seeds.py --setting sinusoid-paper`); device: "
        f"{first['device']}.",
        "",
        f"| run | α·λ at the start: median / max | tasks with α·λ > 2 at the start | ... at any of the "
        f"{first['steps'] + 1} points | query MSE after {first['steps']} steps (median) | tasks that blow up |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    lines += [row(name, r) for name, r in results.items()]
    (docs / "curvature.md").write_text(shown("\n".join(lines)) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="trained sinusoid run folders (their --out)")
    parser.add_argument("--tasks", type=int, default=100)
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--power-iters", type=int, default=30)
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--docs", default=str(DOCS))
    args = parser.parse_args()
    docs = Path(args.docs)
    path = docs / "curvature.json"
    results = json_or_empty(path)
    for run in args.runs:
        name = f"{Path(run).name}, {args.shots}-shot"
        results[name] = measure(Path(run), args.tasks, args.shots, args.steps, args.lr, args.power_iters, args.seed)
        print(row(name, results[name]), flush=True)
    write_json(path, results)
    write_report(results, docs)


def json_or_empty(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


if __name__ == "__main__":
    main()
