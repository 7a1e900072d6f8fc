"""Speed and memory harness: metaopt vs hand-written loops on the same model, tasks and seeds.

    python benchmarks/speed.py                    # all workloads, all contenders, memory vs K
    python benchmarks/speed.py --quick            # smaller workload list (CI-sized smoke: --smoke)

Every (workload, contender) pair runs in fresh processes, in --rounds interleaved rounds (every
contender once per round, the order reversed on odd rounds, so a machine that slows down for a
few minutes slows every contender alike): median seconds per meta-iteration (zero_grad +
meta-gradient + Adam step) over the --iters timed iterations of every round (after --warmup
untimed ones per process), and the peak resident memory during the timed iterations (Linux VmHWM,
reset after warm-up; on CUDA, torch.cuda.max_memory_allocated).  Before timing (first round),
each contender that computes the MAML meta-gradient is checked on the first batch against a
float64 reference (the hand-written torch.func loop in double precision, its own process):
largest entry error relative to the reference's largest entry.  --check-only redoes just these
checks (no timing) for the given workloads of an existing speed.json.
Every contender's process gets the same allocator setting (--malloc): ``keep`` (default) calls
metaopt.allocator.keep_freed_memory() first, as ``metaopt train`` does on CPU; ``default`` keeps
glibc's thresholds, under which a per-task loop faults its freed graph memory in again on every
task.  Minor page faults per timed iteration are recorded next to the time.
Writes docs/benchmarks/speed.{json,md} and PNG plots.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import runpy
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import DOCS, device_name, status_mib, write_json
from contenders import CONTENDERS, func_step_fn
from workloads import WORKLOADS, loss_of, make_batches, make_model

#: Python files that register more contenders or workloads (--register), loaded by every worker too
REGISTERED: list[str] = []
QUICK = ["sinusoid mlp, 10-shot, mb 25, K=1", "conv4 28px 5w1s, mb 8, K=1", "conv4 28px 5w1s, mb 8, K=5"]
MEMORY_K = [1, 3, 5, 10]
MEMORY_WORKLOAD = "conv4 28px 5w1s, mb 8, K=1"
MEMORY_CONTENDERS = [
    "metaopt maml",
    "metaopt fomaml",
    "metaopt convergent_fo",
    "metaopt maml (per_task_backward=False)",
    "metaopt maml (vmap)",
]
# glibc: a fixed mmap threshold returns every large freed block to the OS at once, so the
# resident set follows live memory and "peak - resident before the timed steps" is the step's need.
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


# -- the worker (one per process) -------------------------------------------------------------
def grads_of(model) -> list:
    return [None if p.grad is None else p.grad.detach().clone() for p in model.parameters()]


def computes_maml_gradient(contender: str) -> bool:
    """The contenders checked against the float64 reference (the plugins change the maths)."""
    return CONTENDERS.get(contender).maml


def float64_reference(spec: dict[str, Any]) -> dict[str, Any]:
    """Worker: the hand torch.func loop's meta-gradient on the first batch in float64, saved to a file."""
    import torch

    wl = WORKLOADS.get(spec["workload"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = make_model(wl["model"]).to(device, torch.float64)
    tasks = [
        tuple(t.to(device, torch.float64) if t.is_floating_point() else t.to(device) for t in task)
        for task in make_batches(wl["model"], wl["meta_batch"], 1)[0]
    ]
    func_step_fn(model, wl["steps"], wl["lr"], loss_of(wl["model"]))(tasks)
    torch.save([g.cpu() for g in grads_of(model)], spec["reference_file"])
    return {"saved": spec["reference_file"]}


def error_vs_reference(model, reference_file: str) -> float:
    """Largest |g - g_float64| over all entries, relative to the largest |g_float64| (a per-tensor
    ratio is ill-posed for tensors whose true gradient is ~0, e.g. a conv bias before BatchNorm)."""
    import torch

    got = grads_of(model)
    pairs = [
        (torch.zeros_like(b) if a is None else a.double().cpu(), b) for a, b in zip(got, torch.load(reference_file))
    ]
    largest = max(float(b.abs().max()) for _, b in pairs)
    return max(float((a - b).abs().max()) for a, b in pairs) / (largest + 1e-300)


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    if spec.get("float64_reference"):
        return float64_reference(spec)
    malloc = "glibc defaults"
    if spec.get("malloc", "keep") == "keep":  # the same allocator setting for every contender of a run
        from metaopt.allocator import keep_freed_memory

        malloc = "keep freed memory" if keep_freed_memory() else "defaults (keep_freed_memory: not glibc)"
    wl = WORKLOADS.get(spec["workload"])
    steps = spec.get("steps", wl["steps"])
    loss_fn = loss_of(wl["model"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    count = 1 if spec.get("check_only") else spec["warmup"] + spec["iters"]
    batches = make_batches(wl["model"], wl["meta_batch"], count)
    batches = [[tuple(t.to(device) for t in task) for task in tasks] for tasks in batches]
    contender = spec["contender"]
    reference = spec.get("reference_file") if computes_maml_gradient(contender) else None

    model = make_model(wl["model"]).to(device)
    try:
        built = CONTENDERS.get(contender).build(model, steps, wl["lr"], loss_fn)
    except ImportError as exc:  # an optional contender (torchopt) that is not installed
        return {"error": f"{contender} needs a package that is not installed ({exc})"}
    step, params, learner = built.step, built.params, built.learner
    optimizer = torch.optim.Adam(params, lr=1e-3)

    result: dict[str, Any] = {"malloc": malloc}
    if learner is not None:
        result["engine"] = learner.engine_for(list(batches[0]))
    optimizer.zero_grad(set_to_none=True)
    step(batches[0])
    if reference is not None:
        result["rel_err_vs_float64"] = error_vs_reference(model, reference)
    if spec.get("check_only"):
        return result
    optimizer.step()
    for tasks in batches[1 : spec["warmup"]]:
        optimizer.zero_grad(set_to_none=True)
        step(tasks)
        optimizer.step()

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        result["baseline_mib"] = torch.cuda.memory_allocated() / 2**20
    else:
        Path("/proc/self/clear_refs").write_text("5")
        result["baseline_mib"] = status_mib("VmRSS")
    times = []
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for tasks in batches[spec["warmup"] :]:
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        step(tasks)
        optimizer.step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    result["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20 if cuda else status_mib("VmHWM")
    result["extra_mib"] = result["peak_mib"] - result["baseline_mib"]
    result["minor_faults_per_iter"] = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / len(times)
    result["median_s"] = statistics.median(times)
    result["times"] = times
    return result


# -- the driver ---------------------------------------------------------------------------------
def make_reference(workload: str, scratch: Path) -> str:
    """The float64 reference meta-gradient of a workload, computed in its own process: a file path."""
    path = str(scratch / f"reference-{abs(hash(workload))}.pt")
    done = run_worker({"workload": workload, "float64_reference": True, "reference_file": path})
    if "error" in done:
        raise RuntimeError(f"float64 reference of {workload!r} failed: {done['error']}")
    return path


def check_only(results: dict[str, Any], workloads: list[str], contenders: list[str], scratch: Path) -> None:
    """Redo the float64 checks of timed rows without timing them (fine on a busy machine)."""
    for wl in workloads:
        rows = results["speed"].get(wl, {})
        checked = [c for c in contenders if computes_maml_gradient(c) and "median_s" in rows.get(c, {})]
        if not checked:
            continue
        reference = make_reference(wl, scratch)
        for c in checked:
            got = run_worker({"workload": wl, "contender": c, "check_only": True, "reference_file": reference})
            if "error" in got:
                raise RuntimeError(f"check of {c!r} on {wl!r} failed: {got['error']}")
            rows[c]["rel_err_vs_float64"] = got["rel_err_vs_float64"]
            print(wl, c, got, flush=True)
        results["check_runs"][wl] = {
            "started": time.strftime("%Y-%m-%d %H:%M"),
            "device": device_name(),
            "argv": shlex.join(sys.argv[1:]),
        }


def load_registrations(paths: list[str]) -> None:
    """Run each file once: its ``CONTENDERS.register`` / ``WORKLOADS.register`` calls add entries."""
    for path in paths:
        if path not in REGISTERED:
            runpy.run_path(path)
            REGISTERED.append(path)


def run_worker(spec: dict[str, Any], env: dict[str, str] | None = None) -> dict[str, Any]:
    spec = {**spec, "register": REGISTERED}
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=3600,
        env={**os.environ, **(env or {})},
    )
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def combine_rounds(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One contender's result from its rounds: median over all timed iterations, worst memory."""
    failed = [r for r in runs if "error" in r]
    if failed:
        return failed[0]
    times = [t for r in runs for t in r["times"]]
    combined = {**runs[0], "times": times, "median_s": statistics.median(times)}
    combined["round_medians"] = [r["median_s"] for r in runs]
    for key in ("peak_mib", "extra_mib"):
        if key in runs[0]:
            combined[key] = max(r[key] for r in runs)
    if all("minor_faults_per_iter" in r for r in runs):
        combined["minor_faults_per_iter"] = statistics.median(r["minor_faults_per_iter"] for r in runs)
    return combined


def ratio_table(title: str, rows: dict[str, dict[str, Any]], contenders: list[str], note: list[str]) -> list[str]:
    lines = [
        f"### {title}",
        "",
        *note,
        "| contender | median s/iter (rounds' medians) | × fastest | peak MiB | × smallest | page faults/iter "
        "| meta-grad error vs float64 |",
    ]
    lines.append("| --- | --- | --- | --- | --- | --- | --- |")
    ok = {c: r for c, r in rows.items() if "median_s" in r}
    fastest = min((r["median_s"] for r in ok.values()), default=1.0)
    smallest = min((r["peak_mib"] for r in ok.values()), default=1.0)
    for c in contenders:
        r = rows.get(c)
        if r is None:
            continue
        if "error" in r:
            lines.append(f"| {c} | — | — | — | — | — | not run: {r['error'][:120]} |")
            continue
        check_text = "—"
        if "rel_err_vs_float64" in r:
            check_text = f"{r['rel_err_vs_float64']:.1e}"
        elif "max_rel_grad_diff_vs_metaopt" in r:  # rows timed before the float64 check existed
            check_text = f"{r['max_rel_grad_diff_vs_metaopt']:.1e} vs metaopt"
        elif c == "metaopt maml":
            check_text = "(reference of the older check)"
        faults = f"{r['minor_faults_per_iter']:,.0f}" if "minor_faults_per_iter" in r else "—"
        spread = r.get("round_medians", [])
        spread_text = f" ({min(spread):.4f}–{max(spread):.4f})" if len(spread) > 1 else ""
        lines.append(
            f"| {c} | {r['median_s']:.4f}{spread_text} | {r['median_s'] / fastest:.2f} | {r['peak_mib']:.0f} | "
            f"{r['peak_mib'] / smallest:.2f} | {faults} | {check_text} |"
        )
    return lines + [""]


MALLOC_TEXT = {
    "keep": "freed memory kept in every contender's process (metaopt.allocator.keep_freed_memory)",
    "default": "glibc defaults (runs before --malloc existed, or --malloc default)",
}
HAND = [name for name, entry in CONTENDERS.items() if entry.hand]
ENGINE_ROWS = {
    "loop": "metaopt maml",
    "vmap": "metaopt maml (vmap)",
    "compile": "metaopt maml (compile)",
    "auto": "metaopt maml (auto)",
}
ENGINES = ("loop", "vmap", "compile")  # what a user picks; auto picks one of loop and vmap


def paired(rows: dict[str, dict[str, Any]], contender: str, fastest_hand_s: float) -> str:
    """A contender's time over the fastest hand loop's; with rounds, the range of the per-round
    ratios to the fastest hand contender of the same round (rounds interleave, so a ratio within a
    round cancels slow drifts of the machine)."""
    ratio = f"{rows[contender]['median_s'] / fastest_hand_s:.2f}"
    rounds = rows[contender].get("round_medians", [])
    hands = [rows[c]["round_medians"] for c in HAND if len(rows.get(c, {}).get("round_medians", [])) == len(rounds)]
    if len(rounds) < 2 or not hands:
        return ratio
    per_round = [mine / min(h[i] for h in hands) for i, mine in enumerate(rounds)]
    return f"{ratio} ({min(per_round):.2f}–{max(per_round):.2f})"


def engine_table(results: dict[str, Any]) -> list[str]:
    """Per workload: metaopt's MAML under each engine against the fastest hand-written loop."""
    lines = [
        "## Engines against the fastest hand-written loop",
        "",
        "From the tables below (same runs): metaopt's second-order MAML under each engine, divided by the",
        "fastest of the hand-written contenders timed (raw higher, torch.func per-task loop, TorchOpt, hand vmap,",
        "and hand vmap under torch.compile where it was timed);",
        "in brackets, where the run had several rounds, the range of the same ratio within each round (each",
        "round's median over the fastest hand contender of that round).",
        "",
        "| workload | fastest hand loop | loop × | vmap × | compile × | auto × [engine it picks] | best engine |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for wl, rows in results["speed"].items():
        hand = {c: rows[c]["median_s"] for c in HAND if "median_s" in rows.get(c, {})}
        ours = {e: rows[c]["median_s"] for e, c in ENGINE_ROWS.items() if "median_s" in rows.get(c, {})}
        if not hand or not ours:
            continue
        best_hand = min(hand, key=hand.get)
        cells = [paired(rows, ENGINE_ROWS[e], hand[best_hand]) if e in ours else "—" for e in ENGINES]
        auto = "—"
        if "auto" in ours:
            picked = rows[ENGINE_ROWS["auto"]].get("engine", "?")
            auto = f"{paired(rows, ENGINE_ROWS['auto'], hand[best_hand])} [{picked}]"
        best = min((e for e in ENGINES if e in ours), key=ours.get)
        lines.append(f"| {wl} | {best_hand} ({hand[best_hand]:.4f} s) | {' | '.join(cells)} | {auto} | {best} |")
    return lines + [""]


def summary_plot(plt: Any, speed: dict[str, Any], out: Path) -> list[str]:
    """speed_summary.png: per workload, each metaopt engine's time over the fastest hand-written loop's."""
    names, groups = [], {engine: [] for engine in ENGINE_ROWS}
    for wl, rows in speed.items():
        hands = [rows[c]["median_s"] for c in HAND if "median_s" in rows.get(c, {})]
        if not hands:
            continue
        names.append(wl)
        for engine, row in ENGINE_ROWS.items():
            value = rows.get(row, {}).get("median_s")
            groups[engine].append(float("nan") if value is None else value / min(hands))
    groups = {engine: ratios for engine, ratios in groups.items() if any(r == r for r in ratios)}  # timed ones
    if not names:
        return []
    fig, ax = plt.subplots(figsize=(8, 0.75 * len(names) + 1.2))
    height = 0.8 / len(groups)
    for i, (engine, ratios) in enumerate(groups.items()):
        ys = [y + (i - (len(groups) - 1) / 2) * height for y in range(len(names))]
        ax.barh(ys, [0 if r != r else r for r in ratios], height=height, label=f"metaopt, engine={engine}")
        for y, r in zip(ys, ratios, strict=True):
            if r == r:
                ax.text(r, y, f" {r:.2f}×", va="center", fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_xlabel("time per meta-iteration / fastest hand-written loop (1.0 = as fast; lower is faster)")
    ax.invert_yaxis()
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "speed_summary.png", dpi=90)
    plt.close(fig)
    return ["speed_summary.png"]


def plot(results: dict[str, Any], out: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    made = []
    speed = {wl: rows for wl, rows in results["speed"].items() if any("median_s" in r for r in rows.values())}
    if speed:
        # one panel per workload: metaopt's engines and every hand-written loop, as ratios to the fastest hand loop
        shown = [*ENGINE_ROWS.values(), *HAND]
        fig, axes = plt.subplots(len(speed), 1, figsize=(8, 1.0 + 0.32 * len(shown) * len(speed)), squeeze=False)
        for ax, (wl, rows) in zip(axes[:, 0], speed.items(), strict=True):
            ok = {c: rows[c]["median_s"] for c in shown if "median_s" in rows.get(c, {})}
            hands = {c: t for c, t in ok.items() if c in HAND}
            ref = min(hands.values()) if hands else min(ok.values())
            names = list(ok)
            ratios = [ok[c] / ref for c in names]
            colours = ["tab:gray" if c in HAND else "tab:blue" for c in names]
            ax.barh(names, ratios, color=colours)
            for y, r in enumerate(ratios):
                ax.text(r, y, f" {r:.2f}×", va="center", fontsize=8)
            ax.axvline(1.0, color="k", lw=0.8)
            ax.set_title(wl, fontsize=9, loc="left")
            ax.set_xlim(0, max(ratios) * 1.25)
            ax.invert_yaxis()
            ax.tick_params(axis="y", labelsize=8)
        axes[-1, 0].set_xlabel(
            "time per meta-iteration / fastest hand-written loop (grey: hand-written; blue: metaopt)"
        )
        fig.tight_layout()
        fig.savefig(out / "speed.png", dpi=90)
        plt.close(fig)
        made.append("speed.png")
        made += summary_plot(plt, speed, out)
    memory = results["memory"]
    if memory:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for c in MEMORY_CONTENDERS:
            ks = [k for k in MEMORY_K if "peak_mib" in memory.get(str(k), {}).get(c, {})]
            ax.plot(ks, [memory[str(k)][c]["extra_mib"] for k in ks], marker="o", label=c)
        ax.set_xlabel("inner steps K")
        ax.set_ylabel("memory of one meta-iteration (MiB)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "memory_vs_k.png", dpi=90)
        plt.close(fig)
        made.append("memory_vs_k.png")
    return made


def write_report(results: dict[str, Any], out: Path) -> None:
    lines = [
        "# Speed and memory benchmark",
        "",
        "Produced by `python benchmarks/speed.py` (the command and device of each table are given with it;",
        "`--update` adds or replaces workloads in an existing speed.json and keeps the rest).",
        "Median of the timed meta-iterations after the warm-up ones; each row in its own",
        "process; peak memory = peak resident set of that process during the timed iterations (CPU) or",
        "`torch.cuda.max_memory_allocated` (GPU). 5-way 1-shot tasks have 15 query images per class.",
        "Ratios are to the fastest / smallest contender of the same workload. 'meta-grad error vs float64'",
        "is the largest difference of that contender's float32 meta-gradient on the first batch from the",
        "same meta-gradient computed in float64 (hand torch.func loop, own process), over all entries,",
        "relative to the reference's largest entry: float32 rounding amplified by the problem's",
        "conditioning (and on GPU nondeterministic/TF32 kernels), to be compared between contenders.",
        "Rows timed before that check existed show their older check instead ('vs metaopt': the same",
        "measure taken against metaopt's float32 MAML). The algorithm plugins compute different",
        "gradients by design and are not checked here (their maths is tested in tests/plugins).",
        "",
    ]
    lines += engine_table(results)
    lines += [
        "## Time and memory per workload",
        "",
    ]
    for wl, rows in results["speed"].items():
        meta = results.get("workload_runs", {}).get(wl)
        note = []
        if meta:
            note = [
                f"Run {meta['started']} on {meta['device']}: `python benchmarks/speed.py {meta['argv']}`, "
                f"{meta.get('rounds', 1)} interleaved round(s) of {meta['iters']} timed iterations after "
                f"{meta['warmup']} warm-up; 1-min load average at start "
                f"{meta['load_at_start']:.2f} on {meta['cpus']} CPUs; allocator: "
                f"{MALLOC_TEXT[meta.get('malloc', 'default')]}.",
                "",
            ]
            unfinished = [c for c in meta.get("contenders", []) if c not in rows]
            if unfinished:  # a run stopped by a time limit: the ratios are among the finished rows only
                note += [
                    f"**Unfinished**: the run stopped before {', '.join(unfinished)}; ratios are among the rows "
                    "above only.",
                    "",
                ]
        checked = results.get("check_runs", {}).get(wl)
        if checked:
            note = note[:1] + [
                f"Float64 checks redone {checked['started']} on {checked['device']} (no timing): "
                f"`python benchmarks/speed.py {checked['argv']}`.",
                "",
            ]
        order = [c for c in CONTENDERS.names() if c in rows] + [c for c in rows if c not in CONTENDERS]
        lines += ratio_table(wl, rows, order, note)
    if results["memory"]:
        run = results["memory_run"]
        lines += ["## Peak memory versus inner steps K", ""]
        lines += [
            f"Run {run['started']} on {run['device']}: `python benchmarks/speed.py {run['argv']}`.",
            f"Workload: {run['workload']}, K varied. Memory here is the growth of the resident set during a",
            "meta-iteration above what the process held before it (model, optimizer state, data), run with",
            "`MALLOC_MMAP_THRESHOLD_=65536` so that freed blocks leave the resident set at once.",
            "",
        ]
        lines += [
            "| K | "
            + " | ".join(f"{c} (MiB)" for c in MEMORY_CONTENDERS)
            + " | maml / fomaml | maml / conv. FO | vmap / loop |"
        ]
        lines += ["|" + " --- |" * (len(MEMORY_CONTENDERS) + 4)]
        for k in MEMORY_K:
            row = results["memory"].get(str(k), {})
            peaks = [row.get(c, {}).get("extra_mib") for c in MEMORY_CONTENDERS]
            cells = [f"{p:.0f}" if p else "—" for p in peaks]
            r1 = f"{peaks[0] / peaks[1]:.2f}" if all(peaks[:2]) else "—"
            r2 = f"{peaks[0] / peaks[2]:.2f}" if peaks[0] and peaks[2] else "—"
            r3 = f"{peaks[4] / peaks[0]:.2f}" if peaks[0] and peaks[4] else "—"
            lines.append(f"| {k} | " + " | ".join(cells) + f" | {r1} | {r2} | {r3} |")
        lines.append("")
    for name in plot(results, out):
        lines += [f"![{name}]({name})", ""]
    (out / "speed.md").write_text("\n".join(lines))


def time_workloads(
    args: argparse.Namespace, results: dict[str, Any], workloads: list[str], out: Path, scratch: Path
) -> None:
    """Time every contender on every workload in interleaved rounds (the float64 check in round 0)."""
    for wl in workloads:
        results["speed"][wl] = {}
        results["check_runs"].pop(wl, None)
        results["workload_runs"][wl] = {
            "started": time.strftime("%Y-%m-%d %H:%M"),
            "device": device_name(),
            "argv": shlex.join(sys.argv[1:]),
            "rounds": args.rounds,
            "iters": args.iters,
            "warmup": args.warmup,
            "load_at_start": os.getloadavg()[0],
            "cpus": os.cpu_count(),
            "malloc": args.malloc,
            "contenders": list(args.contenders),
        }
        checked = any(computes_maml_gradient(c) for c in args.contenders)
        reference = make_reference(wl, scratch) if checked else None
        runs: dict[str, list[dict[str, Any]]] = {c: [] for c in args.contenders}
        for r in range(args.rounds):
            for c in args.contenders if r % 2 == 0 else args.contenders[::-1]:
                spec = {
                    "workload": wl,
                    "contender": c,
                    "iters": args.iters,
                    "warmup": args.warmup,
                    "malloc": args.malloc,
                }
                runs[c].append(run_worker({**spec, "reference_file": reference} if r == 0 and reference else spec))
                print(wl, f"round {r}", c, {k: v for k, v in runs[c][-1].items() if k != "times"}, flush=True)
                # after every worker: a run stopped by a time limit (the device check) keeps what it finished
                results["speed"][wl] = {c: combine_rounds(done) for c, done in runs.items() if done}
                write_json(out / "speed.json", results)


def measure_memory(results: dict[str, Any], ks: list[int], out: Path) -> None:
    """Peak memory of one meta-iteration versus inner steps K (second-order MAML and the FO variants)."""
    results["memory_run"] = {
        "workload": MEMORY_WORKLOAD,
        "started": time.strftime("%Y-%m-%d %H:%M"),
        "device": device_name(),
        "argv": shlex.join(sys.argv[1:]),
        "load_at_start": os.getloadavg()[0],
    }
    for k in ks:
        results["memory"][str(k)] = {}
        for c in MEMORY_CONTENDERS:
            # glibc's thresholds, lowered further by MEMORY_ENV: freed blocks leave the resident set at once
            spec = {
                "workload": MEMORY_WORKLOAD,
                "contender": c,
                "iters": 2,
                "warmup": 1,
                "steps": k,
                "malloc": "default",
            }
            results["memory"][str(k)][c] = run_worker(spec, MEMORY_ENV)
            print("memory K", k, c, results["memory"][str(k)][c].get("peak_mib"), flush=True)
            write_json(out / "speed.json", results)


def main() -> None:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--register", action="append", default=[])
    load_registrations(pre.parse_known_args()[0].register)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument(
        "--register",
        action="append",
        default=[],
        metavar="FILE",
        help="a Python file that registers contenders or workloads (docs/benchmarks/README.md); repeatable",
    )
    parser.add_argument("--quick", action="store_true", help=f"only {QUICK}")
    parser.add_argument("--smoke", action="store_true", help="tiny settings to check the harness runs")
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS.names())
    parser.add_argument("--contenders", nargs="+", choices=CONTENDERS.names(), default=CONTENDERS.names())
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of every contender")
    parser.add_argument("--iters", type=int, default=4, help="timed iterations per contender and round")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations per process")
    parser.add_argument(
        "--malloc",
        choices=["keep", "default"],
        default="keep",
        help="keep: every contender's process calls metaopt.allocator.keep_freed_memory() (as metaopt train "
        "does on CPU); default: glibc's own thresholds",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip memory versus K")
    parser.add_argument("--docs", default=str(DOCS))
    parser.add_argument("--update", action="store_true", help="keep the other workloads of an existing speed.json")
    parser.add_argument("--report-only", action="store_true", help="rewrite speed.md and plots from speed.json")
    parser.add_argument(
        "--check-only",
        action="store_true",
        help="only redo the float64 meta-gradient checks of the given workloads in an existing speed.json",
    )
    args = parser.parse_args()
    if args.worker:
        spec = json.loads(args.worker)
        load_registrations(spec.pop("register", []))
        print(json.dumps(worker(spec)))
        return
    if args.report_only:
        write_report(json.loads((Path(args.docs) / "speed.json").read_text()), Path(args.docs))
        return
    workloads = args.workloads or (QUICK if args.quick else WORKLOADS.names())
    if args.smoke:
        workloads, args.rounds, args.iters, args.warmup = ["sinusoid mlp, 10-shot, mb 25, K=1"], 1, 2, 1
    out = Path(args.docs)
    results: dict[str, Any] = {
        "device": device_name(),
        "speed": {},
        "memory": {},
        "workload_runs": {},
        "check_runs": {},
    }
    if args.check_only and not (out / "speed.json").is_file():
        parser.error(f"--check-only updates an existing speed.json, and {out / 'speed.json'} does not exist")
    if (args.update or args.check_only) and (out / "speed.json").is_file():
        previous = json.loads((out / "speed.json").read_text())
        results["speed"] = previous["speed"]
        results["workload_runs"] = previous.get("workload_runs", {})
        results["check_runs"] = previous.get("check_runs", {})
        if args.no_memory or args.check_only:
            results["memory"] = previous["memory"]
            results["memory_run"] = previous.get("memory_run", {})
    with tempfile.TemporaryDirectory(prefix="metaopt-speed-") as scratch:
        if args.check_only:
            check_only(results, workloads, args.contenders, Path(scratch))
            write_json(out / "speed.json", results)
        else:
            time_workloads(args, results, workloads, out, Path(scratch))
            if not args.no_memory:
                measure_memory(results, ks=[1, 3] if args.smoke else MEMORY_K, out=out)
    write_report(results, out)


if __name__ == "__main__":
    main()
