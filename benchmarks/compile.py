"""engine="compile" against the eager engines: time per meta-iteration, compile time, and each
engine's float32 distance from float64 (what the exactness gate is calibrated on).

    python benchmarks/compile.py                 # the registered workloads below, 20 timed iterations
    python benchmarks/compile.py --workloads "sinusoid mlp, 10-shot, mb 25, K=1" --iters 3   # tiny

Each (workload, engine) runs in a fresh process (one thread): the learner is built, the first
meta-iteration is timed on its own (compilation and, for compile, the exactness gate included),
then the median of ``--iters`` further iterations; every process keeps freed memory as ``metaopt
train`` does on CPU (``--malloc default``: glibc's defaults, as runs before the option had).
Distances: the meta-gradient of the first batch in float32 against the same engine's in float64
(loop and vmap) or, for compile, the gate's own numbers (from the nearest float64 reference: at the
batch, or under rounding of its inputs and results there); all as the largest entry difference over the largest
entry of the float64 gradient.  A refusal by the gate is reported with its message.
Writes docs/benchmarks/compile.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import DOCS, device_name, write_json
from workloads import WORKLOADS, loss_of, make_batches, make_model

DEFAULT_WORKLOADS = [
    "sinusoid mlp, 10-shot, mb 25, K=1",
    "sinusoid mlp, 10-shot, mb 25, K=5",
    "conv4 28px 5w1s, mb 8, K=1",
]
ENGINES = ["loop", "vmap", "compile"]


def meta_gradient(learner: Any, tasks: list[Any]) -> Any:
    import torch

    for p in learner.parameters():
        p.grad = None
    learner.backward(tasks)
    return torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).flatten() for p in learner.parameters()])


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    import metaopt.engines.compile
    from metaopt import ConfigError, MetaLearner

    torch.set_num_threads(1)
    if spec.get("malloc") == "keep":  # as `metaopt train` does on CPU, and benchmarks/speed.py by default
        from metaopt.allocator import keep_freed_memory

        keep_freed_memory()
    metaopt.engines.compile.COMPILE_BACKEND = spec["backend"]
    if spec.get("gate_places"):  # fewer places: shows the gate's float64 check where the places are rough
        import metaopt.engines.gate

        metaopt.engines.gate.GATE_PLACES = spec["gate_places"]
    wl = WORKLOADS.get(spec["workload"])
    batches = make_batches(wl.model, wl.meta_batch, spec["iters"] + 1)

    def build(dtype: Any) -> Any:
        model = make_model(wl.model).to(dtype)
        options = dict(inner_steps=wl.steps, inner_lr=wl.lr, loss_fn=loss_of(wl.model), engine=spec["engine"])
        return MetaLearner(model, **options)

    result: dict[str, Any] = {}
    if spec["engine"] != "compile":  # the engine's own float32 distance from its float64 result
        wide = [tuple(t.double() if t.is_floating_point() else t for t in task) for task in batches[0]]
        g64 = meta_gradient(build(torch.float64), wide)
        g32 = meta_gradient(build(torch.float32), batches[0])
        result["d_float32"] = float((g32.double() - g64).abs().max() / g64.abs().max())
    learner = build(torch.float32)
    optimizer = torch.optim.Adam(learner.parameters(), lr=1e-3)
    start = time.perf_counter()
    try:
        meta_gradient(learner, batches[0])
    except ConfigError as exc:  # the exactness gate refused: its message carries its numbers
        result["refused"] = str(exc)
        return result
    optimizer.step()
    result["first_s"] = time.perf_counter() - start
    times = []
    for tasks in batches[1:]:
        start = time.perf_counter()
        meta_gradient(learner, tasks)
        optimizer.step()
        times.append(time.perf_counter() - start)
    result["median_s"] = statistics.median(times)
    engine = learner.engines.get("compile")
    if engine is not None:
        result.update(graphs=engine.compiles, recompiles=engine.recompiles, gate=engine.gate)
        if engine.gate_graphs_compiled:
            result["gate_graphs"] = engine.gate_graphs_compiled
        result["d_float32"] = engine.gate["d_compiled"]
    return result


#: what the gate reports since it measures from the nearest of several float64 references; pages written
#: before (no ``float64_moves`` in their records) are rendered as they were
GATE_COLUMNS = (
    ", how far float64 itself moves when the inputs move by rounding, which float64 reference was nearest and "
    "where the gate judged (docs/engines.md)"
)


#: the allocator setting of a run (runs before --malloc existed had glibc's defaults and no "malloc" key)
MALLOC = {
    "keep": ", freed memory kept in every process (metaopt.allocator.keep_freed_memory, as `metaopt train` does)",
    "default": ", glibc's allocator defaults",
}


def render(data: dict[str, Any]) -> str:
    placed = any("float64_moves" in r.get("gate", {}) for rows in data["cells"].values() for r in rows.values())
    lines = [
        "# engine='compile' against the eager engines",
        "",
        f"`{data['command']}` — {data['device']}, one thread, a fresh process per cell, {data['date']}"
        f"{MALLOC[data.get('malloc', 'default')]}. "
        "First: the first meta-iteration (compilation and, for compile, the exactness gate included). Step: median of "
        "the following iterations. ×: step time over the vmap engine's. Distance: the float32 meta-gradient of the "
        "first batch from float64 (largest entry difference over the largest entry); for compile, the gate's own "
        f"measurement, with its bound{GATE_COLUMNS if placed else ''}. Break-even: iterations after which compile's "
        "first-call cost is repaid by its faster steps (— where it is not faster).",
        "",
        "| workload | engine | first s | step s | × vmap | float32 distance from float64 | graphs / recompiles | "
        "break-even iterations |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for wl, rows in data["cells"].items():
        vmap = rows.get("vmap", {}).get("median_s")
        for engine, r in rows.items():
            if "error" in r:
                lines.append(f"| {wl} | {engine} | {r['error']} | | | | | |")
                continue
            if "refused" in r:
                lines.append(f"| {wl} | {engine} | refused: {r['refused']} | | | | | |")
                continue
            ratio = f"{r['median_s'] / vmap:.2f}" if vmap else "—"
            distance = f"{r['d_float32']:.2g}"
            graphs, even = "", ""
            if engine == "compile":
                gate = r["gate"]
                distance += f" (eager {gate['d_eager']:.2g}; bound {gate['tolerance']:.2g}"
                if "float64_moves" in gate:
                    distance += f"; float64 moves {gate['float64_moves']:.2g}; nearest: {gate['nearest_reference']}"
                    distance += f"; judged at {gate['judged_at']}"
                for place in gate.get("places", [])[:-1]:  # the places that could not judge, before it
                    distance += (
                        f"; before, at {place['judged_at']}: compiled {place['d_compiled']:.2g}, eager "
                        f"{place['d_eager']:.2g}, bound {place['tolerance']:.2g}, float64 moves {place['float64_moves']:.2g}"
                    )
                if "float64_compiled" in gate:
                    distance += f"; compiled code in float64 {gate['float64_compiled']:.2g} from eager float64"
                distance += ")"
                graphs = f"{r['graphs']} / {r['recompiles']}"
                if r.get("gate_graphs"):
                    graphs += f" (and {r['gate_graphs']} float64 graph for the gate)"
                saved = (vmap or 0) - r["median_s"]
                even = f"{(r['first_s'] - rows['vmap']['first_s']) / saved:.0f}" if vmap and saved > 0 else "—"
            lines.append(
                f"| {wl} | {engine} | {r['first_s']:.2f} | {r['median_s']:.4f} | {ratio} | {distance} | {graphs} | {even} |"
            )
    return "\n".join(lines) + "\n"


def write_report(data: dict[str, Any], docs: Path) -> None:
    (docs / "compile.md").write_text(render(data))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", nargs="+", default=DEFAULT_WORKLOADS, choices=WORKLOADS.names())
    parser.add_argument("--engines", nargs="+", default=ENGINES, choices=ENGINES)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (the tests use aot_eager)")
    parser.add_argument("--docs", default=str(DOCS))
    parser.add_argument(
        "--malloc",
        choices=["keep", "default"],
        default="keep",
        help="keep: metaopt.allocator.keep_freed_memory() in every cell's process, as `metaopt train` does on CPU",
    )
    parser.add_argument(
        "--gate-places",
        type=int,
        help="places the exactness gate may judge at (default: the gate's own, metaopt.engines.gate.GATE_PLACES)",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    docs = Path(args.docs)
    docs.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {
        "command": shlex.join(["python", "benchmarks/compile.py", *sys.argv[1:]]),
        "device": device_name(),
        "date": time.strftime("%Y-%m-%d"),
        "malloc": args.malloc,
        "cells": {},
    }
    for wl in args.workloads:
        for engine in args.engines:
            spec = {
                "workload": wl,
                "engine": engine,
                "iters": args.iters,
                "backend": args.backend,
                "malloc": args.malloc,
                "gate_places": args.gate_places,
            }
            proc = subprocess.run(
                [sys.executable, __file__, "--worker", json.dumps(spec)],
                capture_output=True,
                text=True,
                env={**os.environ, "OMP_NUM_THREADS": "1"},
            )
            if proc.returncode != 0:
                cell = {"error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1][:200]}
            else:
                cell = json.loads(proc.stdout.strip().splitlines()[-1])
            data["cells"].setdefault(wl, {})[engine] = cell
            print(wl, engine, cell, flush=True)
            write_json(docs / "compile.json", data)
    write_report(data, docs)
    print(render(data))


if __name__ == "__main__":
    main()
