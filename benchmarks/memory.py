"""Peak memory and time of one meta-iteration against the number of inner steps K.

Contenders: second-order MAML keeping every step's graph (``memory="keep"``, the default),
second-order MAML recomputing each step in the outer backward (``memory="recompute"``), and
FOMAML (no second-order graph), on the loop and the vmap engine (vmap ``keep`` holds every task's
graph of every step at once: K above ``--vmap-max-k`` is not run for it).  Every
(contender, K) runs in two fresh processes: in one, after a one-task first-order warm-up, the
growth of the resident set during the first meta-iteration (peak RSS after it minus RSS before it,
with glibc returning freed blocks at once: ``MALLOC_MMAP_THRESHOLD_=16384``); in the other, with
glibc's defaults, the median time of the meta-iterations after the first.

    python benchmarks/memory.py                      # conv4 5-way 1-shot mb 8, K in 1 5 10 25 50 100
    python benchmarks/memory.py --model resnet10t --image-size 84 --meta-batch 2 --steps 1 5 10 25
    python benchmarks/memory.py --cap-mib 1500 ...   # also: the largest K that fits under a memory cap
    python benchmarks/memory.py --capped --steps 50 --cap-extra-mib 400 --cap-iters 10   # then: training under a
                                                     # memory cgroup (--cap-eval-tasks: test tasks scored, 100)

Writes docs/benchmarks/memory.md (and .json) unless --docs says elsewhere.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import write_json

ROOT = Path(__file__).resolve().parents[1]
CONTENDERS = {
    "keep (loop)": dict(memory="keep", engine="loop", first_order=False),
    "recompute (loop)": dict(memory="recompute", engine="loop", first_order=False),
    "fomaml (loop)": dict(memory="keep", engine="loop", first_order=True),
    "keep (vmap)": dict(memory="keep", engine="vmap", first_order=False),
    "recompute (vmap)": dict(memory="recompute", engine="vmap", first_order=False),
    "fomaml (vmap)": dict(memory="keep", engine="vmap", first_order=True),
}


#: glibc returns freed blocks to the system at once, so the resident set follows the memory in use
RETURN_FREED = {"MALLOC_MMAP_THRESHOLD_": "16384", "MALLOC_TRIM_THRESHOLD_": "0"}


def _rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One (contender, K) in this process: RSS growth of the first meta-iteration, then timings."""
    import torch
    import torch.nn.functional as F

    import metaopt
    from metaopt.data.glyphs import GlyphTasks
    from metaopt.trainer import TrainConfig, build_model

    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = TrainConfig(model=spec["model"], image_size=spec["image_size"], ways=5, shots=1, query=15)
    model = build_model(config)
    options = CONTENDERS[spec["contender"]]
    learner = metaopt.MetaLearner(model, inner_steps=spec["steps"], inner_lr=0.1, loss_fn=F.cross_entropy, **options)
    glyphs = GlyphTasks(ways=5, shots=1, query=15, size=spec["image_size"], seed=0)
    batches = [[glyphs.sample_task() for _ in range(spec["meta_batch"])] for _ in range(spec["iters"] + 1)]
    # warm-up: one first-order task (lazy initialisations, thread pools) with a small peak of its own
    warm = metaopt.MetaLearner(model, inner_steps=1, inner_lr=0.1, first_order=True, engine=options["engine"])
    warm.backward(batches[0][:1])
    for p in learner.parameters():
        p.grad = None
    before = _rss_mib()
    learner.backward(batches[0])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    times = []
    for batch in batches[1:]:
        for p in learner.parameters():
            p.grad = None
        start = time.perf_counter()
        learner.backward(batch)
        times.append(time.perf_counter() - start)
    snapshot = sum(p.numel() * p.element_size() for p in learner.model.parameters()) / 2**20
    return {"growth_mib": peak - before, "median_s": statistics.median(times), "snapshot_mib": snapshot}


#: inner steps of the capped run's test tasks (evaluation holds no meta-graph; 10 steps, as MAML tests)
EVAL_STEPS = 10


def capped_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """After one warm-up meta-iteration, train second-order MAML inside a memory cgroup; report how far
    it got, its peak in the cgroup and the test accuracy when it finished."""
    import torch

    import metaopt
    from metaopt.data.glyphs import GlyphTasks
    from metaopt.trainer import TrainConfig, build_model

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model(TrainConfig(model=spec["model"], image_size=spec["image_size"], ways=5, shots=1, query=15))
    learner = metaopt.MetaLearner(model, inner_steps=spec["steps"], inner_lr=0.1, memory=spec["memory"])
    optimizer = torch.optim.Adam(learner.parameters(), lr=1e-3)
    train = GlyphTasks(ways=5, shots=1, query=15, size=spec["image_size"], seed=0)
    test = GlyphTasks(ways=5, shots=1, query=15, size=spec["image_size"], seed=1, split="test")
    learner.backward([train.sample_task() for _ in range(spec["meta_batch"])])  # warm-up: lazy loads, caches
    optimizer.zero_grad(set_to_none=True)
    enter_memory_cgroup(spec["cgroup"])  # from here on, every page this process touches counts against the cap
    start, done = time.perf_counter(), 0
    try:
        for _ in range(spec["iters"]):
            optimizer.zero_grad(set_to_none=True)
            learner.backward([train.sample_task() for _ in range(spec["meta_batch"])])
            optimizer.step()
            done += 1
        seconds = time.perf_counter() - start
        train_peak = int(Path(spec["cgroup"], "memory.max_usage_in_bytes").read_text()) / 2**20
        sizes = [min(4, spec["eval_tasks"] - first) for first in range(0, spec["eval_tasks"], 4)]
        task_weighted = [  # each batch's mean accuracy times its number of tasks
            learner.evaluate([test.sample_task() for _ in range(n)], steps=EVAL_STEPS).metrics["accuracy"] * n
            for n in sizes
        ]
    except (RuntimeError, MemoryError, metaopt.MetaOptError) as exc:
        cause = exc.__cause__ or exc
        return {"finished": False, "iterations": done, "error": f"{type(cause).__name__}: {str(cause)[:120]}"}
    accuracy = sum(task_weighted) / spec["eval_tasks"]  # the mean over tasks (batches of 4, the last maybe fewer)
    peak = int(Path(spec["cgroup"], "memory.max_usage_in_bytes").read_text()) / 2**20
    return {
        "finished": True,
        "iterations": done,
        "seconds": seconds,
        "test_accuracy": accuracy,
        "train_peak_mib": train_peak,
        "peak_mib": peak,
    }


def memory_cgroup(limit_mib: float) -> Path | None:
    """A cgroup-v1 memory cgroup below this process's own, limited to ``limit_mib`` (None where
    cgroups cannot be made: not root, cgroup v2 only, a container that forbids it)."""
    try:
        line = next(x for x in Path("/proc/self/cgroup").read_text().splitlines() if ":memory:" in x)
        group = Path("/sys/fs/cgroup/memory") / line.split(":", 2)[2].lstrip("/") / f"metaopt-cap-{os.getpid()}"
        group.mkdir(exist_ok=True)
        (group / "memory.limit_in_bytes").write_text(str(int(limit_mib * 2**20)))
        return group
    except (OSError, StopIteration):
        return None


def enter_memory_cgroup(group: str) -> None:
    Path(group, "cgroup.procs").write_text(str(os.getpid()))


def capped_run(args: argparse.Namespace) -> dict[str, Any]:
    rows = []
    for memory in ("keep", "recompute"):
        group = memory_cgroup(args.cap_extra_mib)
        if group is None:
            rows.append((memory, {"finished": False, "iterations": 0, "error": "no memory cgroup could be made here"}))
            continue
        spec = dict(
            memory=memory,
            steps=args.steps[-1],
            model=args.model,
            image_size=args.image_size,
            meta_batch=args.meta_batch,
            iters=args.cap_iters,
            eval_tasks=args.cap_eval_tasks,
            cgroup=str(group),
        )
        proc = subprocess.run(
            [sys.executable, __file__, "--capped-worker", json.dumps(spec)],
            capture_output=True,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1", **RETURN_FREED},
        )
        if proc.returncode == -9:
            result = {"finished": False, "iterations": None, "error": "killed at the cgroup's memory limit"}
        elif proc.returncode != 0:
            result = {"finished": False, "iterations": 0, "error": f"exit {proc.returncode}: {proc.stderr[-160:]!r}"}
        else:
            result = json.loads(proc.stdout.strip().splitlines()[-1])
        with contextlib.suppress(OSError):
            group.rmdir()
        rows.append((memory, result))
        print(memory, result, flush=True)
    return {
        "settings": {
            "steps": args.steps[-1],
            "cap_extra_mib": args.cap_extra_mib,
            "cap_iters": args.cap_iters,
            "cap_eval_tasks": args.cap_eval_tasks,
            "model": args.model,
            "image_size": args.image_size,
            "meta_batch": args.meta_batch,
        },
        "rows": dict(rows),
    }


def capped_section(capped: dict[str, Any]) -> str:
    c = capped["settings"]
    eval_tasks = c.get("cap_eval_tasks", 100)
    eval_flag = "" if eval_tasks == 100 else f" --cap-eval-tasks {eval_tasks}"
    lines = [
        "",
        f"## Under a memory cap: K={c['steps']}, second order, {c['cap_iters']} iterations",
        "",
        f"`python benchmarks/memory.py --capped --steps {c['steps']} --cap-extra-mib {c['cap_extra_mib']:g} "
        f"--cap-iters {c['cap_iters']}{eval_flag}` — {c['model']} {c['image_size']} px 5-way 1-shot, meta-batch "
        f"{c['meta_batch']}, Adam 1e-3; after set-up and one warm-up meta-iteration each process moves into a memory "
        f"cgroup (v1) limited to {c['cap_extra_mib']:g} MiB: every page it touches from then on counts, and the kernel "
        "kills it at the limit (glibc returning freed blocks at once, as for the table).",
        "",
        f"| memory | finished | iterations | time | peak in the cgroup (training) | test accuracy "
        f"({eval_tasks} tasks, "
        f"{EVAL_STEPS} steps) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for memory, r in capped["rows"].items():
        if r["finished"]:
            lines.append(
                f"| {memory} | yes | {r['iterations']} | {r['seconds']:.0f} s | {r['train_peak_mib']:.0f} MiB | "
                f"{r['test_accuracy']:.3f} |"
            )
        else:
            done = "—" if r["iterations"] is None else r["iterations"]
            lines.append(f"| {memory} | no: {r['error']} | {done} | — | — | — |")
    return "\n".join(lines) + "\n"


def run_cell(spec: dict[str, Any]) -> dict[str, Any] | None:
    """Memory in one fresh process (glibc returning freed blocks at once, so the resident set follows
    the memory in use), time in another (glibc's defaults, as a run would have them)."""
    memory = run_one(spec, extra_env=RETURN_FREED)
    if memory is None:
        return None
    timing = run_one(spec)
    return None if timing is None else {**memory, "median_s": timing["median_s"]}


def run_one(
    spec: dict[str, Any], cap_mib: float | None = None, extra_env: dict[str, str] | None = None
) -> dict[str, Any] | None:
    """The worker in a fresh process (under an address-space cap, if given); None when it ran out of memory."""
    cmd = [sys.executable, __file__, "--worker", json.dumps(spec)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(extra_env or {})}
    cap_mib = cap_mib if cap_mib is not None else spec.get("cap_mib")
    if cap_mib is not None:
        env["METAOPT_BENCH_CAP_MIB"] = str(cap_mib)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        if "out of memory" in proc.stderr.lower() or "cannot allocate" in proc.stderr.lower() or proc.returncode < 0:
            return None
        raise RuntimeError(f"{spec} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def render(data: dict[str, Any]) -> str:
    """The page: the table of ``data["cells"]``, the ratios, and the capped run when there is one."""
    settings, results = data["settings"], data["cells"]
    ks = settings["steps"]
    lines = [
        "# Memory and time against inner steps K",
        "",
        f"`{settings['command']}` — {settings['model']} {settings['image_size']} px, "
        f"5-way 1-shot 15-query, meta-batch {settings['meta_batch']}, CPU, one thread, a fresh process per cell. "
        "Growth: peak resident set during the first meta-iteration minus the resident set before it (MiB; "
        "freed blocks returned at once). "
        "Time: median of the following iterations (s). '—': not run (refused or out of memory).",
        *(
            ["", "Cells redone afterwards (`--update`): " + "; ".join(f"`{c}`" for c in settings["updates"]) + "."]
            if settings.get("updates")
            else []
        ),
        "",
        "| contender | " + " | ".join(f"K={k} MiB" for k in ks) + " | " + " | ".join(f"K={k} s" for k in ks) + " |",
        "| --- |" + " --- |" * (2 * len(ks)),
    ]
    for name in CONTENDERS:
        cells = [results.get(f"{name}/K={k}") for k in ks]
        mib = [f"{c['growth_mib']:.0f}" if c else "—" for c in cells]
        sec = [f"{c['median_s']:.3f}" if c else "—" for c in cells]
        lines.append(f"| {name} | " + " | ".join(mib) + " | " + " | ".join(sec) + " |")
    for engine in ("loop", "vmap"):
        keep = [results.get(f"keep ({engine})/K={k}") for k in ks]
        rec = [results.get(f"recompute ({engine})/K={k}") for k in ks]
        pairs = [(k, a, b) for k, a, b in zip(ks, keep, rec, strict=True) if a and b]
        if pairs:
            lines += ["", f"Ratios, recompute against keep ({engine} engine):", "", "| K | memory growth | time |"]
            lines.append("| --- | --- | --- |")
            for k, a, b in pairs:
                lines.append(
                    f"| {k} | {b['growth_mib'] / a['growth_mib']:.2f}× | {b['median_s'] / a['median_s']:.2f}× |"
                )
        if rec[0] and rec[-1]:
            # every task of the batch keeps its K iterates (batch.tasks / the chunk's trajectory) until the batch ends
            snapshots = rec[-1]["snapshot_mib"] * ks[-1] * settings["meta_batch"]
            beyond = rec[-1]["growth_mib"] - snapshots
            lines += [
                "",
                f"Recompute ({engine}): growth at K={ks[-1]} beyond the parameter snapshots ({ks[-1]} steps × "
                f"{settings['meta_batch']} tasks × {rec[-1]['snapshot_mib']:.2f} MiB = {snapshots:.1f} MiB): {beyond:.1f} MiB, "
                f"{beyond / rec[0]['growth_mib']:.2f}× its growth at K={ks[0]} ({rec[0]['growth_mib']:.1f} MiB).",
            ]
    for png in data.get("plots", []):
        lines += ["", f"![{png}]({png})"]
    text = "\n".join(lines) + "\n"
    return text + (capped_section(data["capped"]) if data.get("capped") else "")


def write_report(data: dict[str, Any], docs: Path) -> None:
    """``NAME.md`` from the JSON (and its plot); NAME is the run's ``--name``."""
    name = data["settings"]["name"]
    data["plots"] = plot(data, docs)
    (docs / f"{name}.md").write_text(render(data))


def plot(data: dict[str, Any], docs: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    settings, cells = data["settings"], data["cells"]
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for name in CONTENDERS:
        ks = [k for k in settings["steps"] if cells.get(f"{name}/K={k}")]
        if ks:
            style = "--" if "vmap" in name else "-"
            ax.plot(ks, [cells[f"{name}/K={k}"]["growth_mib"] for k in ks], style, marker="o", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("inner steps K")
    ax.set_ylabel("memory growth of one meta-iteration (MiB)")
    ax.set_title(f"{settings['model']} {settings['image_size']} px, meta-batch {settings['meta_batch']}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    name = f"{settings['name']}.png"
    fig.savefig(docs / name, dpi=90)
    plt.close(fig)
    return [name]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="conv4")
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--meta-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 5, 10, 25, 50, 100])
    parser.add_argument("--iters", type=int, default=3, help="timed iterations after the measured first one")
    parser.add_argument("--contenders", nargs="+", choices=list(CONTENDERS), default=list(CONTENDERS))
    parser.add_argument(
        "--vmap-max-k", type=int, default=25, help="vmap keep holds every task's graph: larger K not run for it"
    )
    parser.add_argument("--cap-mib", type=float, default=8192, help="address-space cap of each cell's process")
    parser.add_argument("--docs", default=str(ROOT / "docs" / "benchmarks"), help="folder for memory.md/.json")
    parser.add_argument("--name", default="memory", help="file name stem of the report")
    parser.add_argument(
        "--capped", action="store_true", help="the capped run (see --cap-extra-mib) instead of the table"
    )
    parser.add_argument("--cap-extra-mib", type=float, default=800)
    parser.add_argument("--cap-iters", type=int, default=30)
    parser.add_argument("--cap-eval-tasks", type=int, default=100, help="test tasks scored after the capped run")
    parser.add_argument("--capped-worker", help=argparse.SUPPRESS)
    parser.add_argument("--report-only", action="store_true", help="rewrite NAME.md (and its plot) from NAME.json")
    parser.add_argument("--update", action="store_true", help="keep the other cells (and the capped run) of NAME.json")
    args = parser.parse_args()
    for flag in ("iters", "cap_iters", "cap_eval_tasks", "meta_batch"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} {getattr(args, flag)}: give at least 1")
    if args.capped_worker:
        print(json.dumps(capped_worker(json.loads(args.capped_worker))))
        return
    docs = Path(args.docs)
    docs.mkdir(parents=True, exist_ok=True)
    path = docs / f"{args.name}.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    if args.capped:
        if "settings" not in data:
            parser.error(f"--capped adds a section to the table in {path}, which has none: run the table first")
        data["capped"] = capped_run(args)
        write_json(path, data)
        write_report(data, docs)
        return
    if args.report_only:
        write_report(data, docs)
        return
    if args.worker:
        cap = os.environ.get("METAOPT_BENCH_CAP_MIB")
        if cap:
            limit = int(float(cap) * 2**20)
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        print(json.dumps(worker(json.loads(args.worker))))
        return
    settings = {
        "name": args.name,
        "command": shlex.join(["python", "benchmarks/memory.py", *sys.argv[1:]]),
        "model": args.model,
        "image_size": args.image_size,
        "meta_batch": args.meta_batch,
        "steps": args.steps,
        "iters": args.iters,
    }
    cells = data.get("cells", {}) if args.update else {}
    if args.update:  # the page keeps the full run's command and settings; this one only redoes cells
        settings = data.get("settings", settings)
        settings.setdefault("updates", []).append(shlex.join(["python", "benchmarks/memory.py", *sys.argv[1:]]))
        settings["steps"] = sorted(set(settings["steps"]) | set(args.steps))  # the table shows every K it has
    data = {"settings": settings, "cells": cells, "capped": data.get("capped") if args.update else None}
    for name in args.contenders:
        for k in args.steps:
            if name == "keep (vmap)" and k > args.vmap_max_k:
                cells[f"{name}/K={k}"] = None
                continue
            spec = dict(
                contender=name,
                steps=k,
                model=args.model,
                image_size=args.image_size,
                meta_batch=args.meta_batch,
                iters=args.iters,
                cap_mib=args.cap_mib,
            )
            cells[f"{name}/K={k}"] = run_cell(spec)
            print(name, k, cells[f"{name}/K={k}"], flush=True)
            write_json(path, data)
    write_report(data, docs)
    print(render(data))


if __name__ == "__main__":
    main()
