"""Float64 meta-gradients of every engine against central finite differences, on the given device.

    python benchmarks/fd_check.py --device cuda --docs docs/benchmarks/gpu-check
    python benchmarks/fd_check.py --device cpu --docs /tmp/x --steps 1      # what the tests run

A small conv + BatchNorm + max-pool classifier and a LayerNorm MLP, float64, K inner steps: each
engine's meta-gradient projected on two random directions against a Richardson-extrapolated central
difference of the meta-objective (the loop engine's forward only), and against the loop engine's
meta-gradient.  Writes fd_check.{md,json}.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch
from common import device_name, write_json
from torch import nn

ENGINES = ["loop", "vmap", "compile"]


def models() -> dict[str, nn.Module]:
    from metaopt import HeadedModel

    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten())
    torch.manual_seed(0)
    norm = nn.Sequential(nn.Flatten(), nn.Linear(36, 8), nn.LayerNorm(8), nn.GELU())
    return {
        "conv+BN+max-pool": HeadedModel(conv, nn.Linear(16, 3)).double(),
        "LayerNorm MLP": HeadedModel(norm, nn.Linear(8, 3)).double(),
    }


def tasks(device: torch.device) -> list[tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(3):
        sx, qx = torch.randn(6, 1, 6, 6, generator=g, dtype=torch.float64), torch.randn(9, 1, 6, 6, generator=g)
        out.append((sx, torch.arange(3).repeat(2), qx.double(), torch.arange(3).repeat(3)))
    return [tuple(t.to(device) for t in task) for task in out]


def check(name: str, steps: int, device: torch.device) -> dict[str, Any]:
    from metaopt import MetaLearner

    batch = tasks(device)
    grads = {}
    for engine in ENGINES:
        learner = MetaLearner(models()[name].to(device), inner_steps=steps, inner_lr=0.3, engine=engine)
        learner.backward(batch)
        grads[engine] = torch.cat([p.grad.flatten() for p in learner.model.parameters()])
    reference = MetaLearner(models()[name].to(device), inner_steps=steps, inner_lr=0.3, engine="loop")
    params = list(reference.model.parameters())
    theta = torch.nn.utils.parameters_to_vector(params).detach().clone()

    def objective(flat: torch.Tensor) -> float:
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(flat, params)
        return float(reference.forward(batch).loss.detach())

    def central(direction: torch.Tensor, h: float) -> float:
        return (objective(theta + h * direction) - objective(theta - h * direction)) / (2 * h)

    g = torch.Generator().manual_seed(3)
    directions = [torch.randn(theta.shape, generator=g, dtype=torch.float64).to(device) for _ in range(2)]
    fds = [(4 * central(d, 5e-7) - central(d, 1e-6)) / 3 for d in directions]
    row: dict[str, Any] = {}
    for engine, grad in grads.items():
        fd_error = max(abs(float(grad @ d) - fd) / max(1.0, abs(fd)) for d, fd in zip(directions, fds, strict=True))
        loop_error = float((grad - grads["loop"]).norm() / grads["loop"].norm())
        row[engine] = {"fd_error": fd_error, "vs_loop": loop_error, "passed": fd_error <= 1e-7 and loop_error <= 1e-10}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--docs", required=True)
    args = parser.parse_args()
    device = torch.device(args.device)
    started = time.perf_counter()
    results = {f"{name}, K={k}": check(name, k, device) for name in models() for k in args.steps}
    data = {
        "command": shlex.join(["python", "benchmarks/fd_check.py", *sys.argv[1:]]),
        "device": device_name() if device.type == "cuda" else f"{device_name()} (device {device})",
        "wall_s": round(time.perf_counter() - started, 1),
        "results": results,
    }
    docs = Path(args.docs)
    docs.mkdir(parents=True, exist_ok=True)
    write_json(docs / "fd_check.json", data)
    lines = [
        "# Float64 meta-gradients of every engine against central differences",
        "",
        f"`{data['command']}` — {data['device']}, {data['wall_s']} s. Error: the largest over two random directions "
        "of |projected meta-gradient − Richardson central difference| / max(1, |difference|) (bound 1e-7); vs loop: "
        "relative to the loop engine's meta-gradient (bound 1e-10).",
        "",
        "| model | " + " | ".join(f"{e}: FD error / vs loop" for e in ENGINES) + " |",
        "| --- |" + " --- |" * len(ENGINES),
    ]
    for case, row in results.items():
        cells = []
        for engine in ENGINES:
            r = row[engine]
            cells.append(f"{r['fd_error']:.1e} / {r['vs_loop']:.1e}" + ("" if r["passed"] else " **FAILED**"))
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    (docs / "fd_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if not all(r["passed"] for row in results.values() for r in row.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
