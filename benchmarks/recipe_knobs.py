"""One recipe knob at a time: short runs of a recipe with one change each, scored on Lake-format runs.

    python benchmarks/recipe_knobs.py recipes/omniglot_oneshot_proto_small1.yaml --stop-at 400 \
        --lake-runs /path/runs20 /path/runs100 --steps 0 1 \
        --arm "random tasks=--no-within-alphabet" --arm "no augmentation=--no-augment" \
        --existing "recipe=runs/recipes/omniglot_oneshot_proto_small1" --parallel 2

Each arm trains ``metaopt train --config RECIPE FLAGS`` on the recipe's own schedule (its
``iterations``, so the learning rate at the stop point is the full run's) and is stopped once the
checkpoint of iteration ``--stop-at`` is written (checkpoints are atomic).  ``--existing`` scores a
run trained already (the recipe itself, say) at the same checkpoint.  Every arm is then scored on
each set of Lake-format runs (``metaopt lake-runs``) at each number of test steps.  Appends to
docs/benchmarks/recipe_knobs.json and regenerates recipe_knobs.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from common import DOCS, device_name, paired_difference, summary, write_json


def train_until(recipe: str, out: Path, flags: list[str], stop_at: int) -> Path:
    """Train ``recipe`` with ``flags`` into ``out`` until the checkpoint of ``stop_at`` exists."""
    checkpoint = out / "checkpoints" / f"ckpt-{stop_at:08d}.pt"
    if checkpoint.is_file():
        return checkpoint
    cmd = [sys.executable, "-m", "metaopt.cli", "train", "--config", recipe, "--out", str(out)]
    cmd += ["--overwrite", "--no-progress", *flags]
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{out}.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONSAFEPATH": "1"})
        while proc.poll() is None and not checkpoint.is_file():
            time.sleep(0.5)
        if proc.poll() is None:
            proc.terminate()
            proc.wait()
        elif not checkpoint.is_file():
            raise RuntimeError(
                f"{' '.join(cmd)} ended ({proc.returncode}) without leaving {checkpoint.name} (failed, finished "
                f"before iteration {stop_at}, or pruned it: raise keep_checkpoints); see {out}.log"
            )
    return checkpoint


def score(checkpoint: Path, lake_runs: list[str], steps: list[int]) -> dict[str, Any]:
    from metaopt.data.lake import lake_errors, read_lake_runs
    from metaopt.trainer import load_checkpoint

    config, learner, state = load_checkpoint(checkpoint.parent.parent, checkpoint)
    errors: dict[str, dict[str, float]] = {}
    for path in lake_runs:
        tasks = read_lake_runs(path, size=config.image_size)
        items = sum(len(t.query_y) for t in tasks)
        key = f"{Path(path).name} ({len(tasks)} runs, {items} items)"
        errors[key] = {}
        for k in steps:
            wrong, total, _ = lake_errors(learner, tasks, k)
            errors[key][str(k)] = wrong / total
    return {"train_s": round(float(state.get("elapsed", 0.0)), 1), "errors": errors}


SEEDED = re.compile(r"^(?P<group>.+) seed (?P<seed>\d+)$")


def seed_groups(arms: dict[str, Any]) -> dict[str, dict[int, dict[str, Any]]]:
    """Arms named ``"GROUP seed N"``, by group and seed (other arms are left out)."""
    groups: dict[str, dict[int, dict[str, Any]]] = {}
    for name, row in arms.items():
        if match := SEEDED.match(name):
            groups.setdefault(match["group"], {})[int(match["seed"])] = row
    return groups


def columns_of(arms: dict[str, Any]) -> list[tuple[str, str]]:
    """``(Lake runs, test steps)`` of the first arm's scores: the table's columns."""
    first = next(iter(arms.values()))
    return [(runs, k) for runs, by_steps in first["errors"].items() for k in by_steps]


def seed_table(arms: dict[str, Any], columns: list[tuple[str, str]], reference: str = "recipe") -> list[str]:
    """Mean ± sd over seeds per group, and each group minus ``reference`` paired by seed ± its standard
    error (**resolved** beyond twice it); empty when no arm is named ``"... seed N"``."""
    groups = seed_groups(arms)
    if not groups:
        return []
    lines = [
        f"Over seeds (arms named `GROUP seed N`): mean ± sample sd in points; vs `{reference}`: the mean of the",
        "per-seed differences (same seed: same initialisation and training tasks) ± its standard error,",
        "**resolved** where beyond twice that.",
        "",
        "| group | seeds | " + " | ".join(f"{r}, {k} test steps" for r, k in columns) + " |",
        "| --- | --- | " + " | ".join("---" for _ in columns) + " |",
    ]
    base = groups.get(reference, {})
    for group, by_seed in groups.items():
        cells = []
        common = sorted(set(by_seed) & set(base)) if group != reference else []
        for r, k in columns:
            mean, sd = summary([100 * row["errors"][r][k] for row in by_seed.values()])
            cell = f"{mean:.2f}% ± {sd:.2f}"
            if len(common) > 1:
                diffs = [100 * (by_seed[s]["errors"][r][k] - base[s]["errors"][r][k]) for s in common]
                diff, se, beyond = paired_difference(diffs)
                cell += f"; vs {reference} {diff:+.2f} ± {se:.2f}" + (" **resolved**" if beyond else "")
            cells.append(cell)
        lines.append(f"| {group} | {', '.join(str(s) for s in sorted(by_seed))} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def write_report(results: dict[str, Any], docs: Path) -> None:
    lines = [
        "# Omniglot one-shot recipe: one knob at a time",
        "",
        "Produced by `python benchmarks/recipe_knobs.py`. Each row is the recipe with one change, trained",
        "on the recipe's own schedule and stopped at the checkpoint named, then scored on Lake-format",
        "runs (20-way 1-shot, all classes of a run from one alphabet) written by `metaopt lake-runs` from",
        "alphabets the training archive lacks. One seed per row: with 400 items a difference under ~6",
        "points (2 standard errors of a difference) is not resolved; with 2,000 items, under ~3 points.",
        "",
    ]
    for name, block in results.items():
        arms = block["arms"]
        columns = columns_of(arms)
        lines += [
            f"## {name}",
            "",
            f"Recipe `{block['recipe']}`, stopped at iteration {block['stop_at']}; device: {block['device']}; "
            f"scored {block['scored']}.",
            "",
            "| arm | change | train time (min) | " + " | ".join(f"{r}, {k} test steps" for r, k in columns) + " |",
            "| --- | --- | --- | " + " | ".join("---" for _ in columns) + " |",
        ]
        for arm, row in arms.items():
            cells = [f"{100 * row['errors'][r][k]:.2f}%" for r, k in columns]
            lines.append(f"| {arm} | `{row['change']}` | {row['train_s'] / 60:.1f} | " + " | ".join(cells) + " |")
        lines.append("")
        lines += seed_table(arms, columns)
        if block.get("note"):
            lines += [block["note"], ""]
    (docs / "recipe_knobs.md").write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe")
    parser.add_argument("--stop-at", type=int, required=True)
    parser.add_argument("--lake-runs", nargs="+", required=True)
    parser.add_argument("--steps", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--arm", action="append", default=[], help="'NAME=FLAGS' (FLAGS: metaopt train flags)")
    parser.add_argument(
        "--existing",
        action="append",
        default=[],
        help="'NAME=RUN_DIR' or 'NAME=RUN_DIR|CHANGE', trained already (CHANGE: how it differs from the recipe)",
    )
    parser.add_argument("--parallel", type=int, default=1, help="arms trained at once (1 torch thread each)")
    parser.add_argument("--out-root", default="runs/recipe_knobs")
    parser.add_argument("--name", default=None, help="section name (default: the recipe's file name)")
    parser.add_argument("--note", default=None, help="what the section shows (kept with it; replaces an earlier note)")
    parser.add_argument("--report-only", action="store_true", help="rewrite the note and the table; train nothing")
    parser.add_argument("--docs", default=str(DOCS))
    args = parser.parse_args()
    if args.report_only:
        path = Path(args.docs) / "recipe_knobs.json"
        results = json.loads(path.read_text())
        if args.note is not None:
            results[args.name or Path(args.recipe).stem]["note"] = args.note
        write_json(path, results)
        write_report(results, Path(args.docs))
        return
    arms = dict(a.split("=", 1) for a in args.arm)
    existing = {n: (r.split("|", 1) + [""])[:2] for n, r in (e.split("=", 1) for e in args.existing)}
    changes = {n: change or "(none: the recipe as it is)" for n, (_, change) in existing.items()}
    changes.update(arms)
    checkpoints = {n: Path(r) / "checkpoints" / f"ckpt-{args.stop_at:08d}.pt" for n, (r, _) in existing.items()}
    with ThreadPoolExecutor(max_workers=max(1, args.parallel)) as pool:
        futures = {
            name: pool.submit(
                train_until, args.recipe, Path(args.out_root) / name.replace(" ", "_"), flags.split(), args.stop_at
            )
            for name, flags in arms.items()
        }
        for name, future in futures.items():
            checkpoints[name] = future.result()
    docs = Path(args.docs)
    path = docs / "recipe_knobs.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    block = results.setdefault(
        args.name or Path(args.recipe).stem,
        {"recipe": args.recipe, "stop_at": args.stop_at, "arms": {}},
    )
    block.update(device=device_name(), scored=time.strftime("%Y-%m-%d %H:%M"))
    if args.note is not None:
        block["note"] = args.note
    for name, checkpoint in checkpoints.items():
        row = score(checkpoint, args.lake_runs, args.steps)
        row["change"] = changes[name]
        print(name, row, flush=True)
        block["arms"][name] = row
    write_json(path, results)
    write_report(results, docs)


if __name__ == "__main__":
    main()
