"""Omniglot one-shot: one recipe trained with several seeds, each seed scored, and the seeds as one ensemble.

    python benchmarks/lake_seeds.py --name "small1->small2, proto recipe" --runs RUN_SEED0 RUN_SEED1 \\
        --lake-runs DIR [DIR2 ...] [--steps 0 1] [--command "metaopt train ..."]

Each run's final checkpoint is scored on every folder of Lake-format runs (20-way 1-shot within one
alphabet, as `metaopt lake-runs` writes them) at each number of test steps; the section gives the
error per seed, their mean ± sample standard deviation, and the error of the runs as one ensemble
(mean softmax probability, `metaopt eval --ensemble`).  Appends to docs/benchmarks/lake_seeds.json
and regenerates lake_seeds.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from common import DOCS, device_name, summary, write_json


def score(runs: list[Path], lake_runs: list[str], steps: list[int]) -> dict[str, Any]:
    from metaopt.data.lake import lake_ensemble_errors, lake_errors, read_lake_runs_per_member
    from metaopt.trainer import load_checkpoint

    members = [load_checkpoint(run) for run in runs]
    seeds = [config.seed for config, _, _ in members]
    if len(set(seeds)) != len(seeds):
        raise SystemExit(f"the runs share seeds {seeds}: give one run per seed.")
    learners = [learner for _, learner, _ in members]
    scores: dict[str, Any] = {}
    for folder in lake_runs:
        tasks = read_lake_runs_per_member(folder, [config.image_size for config, _, _ in members])
        errors: dict[str, Any] = {}
        for k in steps:
            per_seed = [lake_errors(learner, t, k) for learner, t in zip(learners, tasks, strict=True)]
            wrong, total, _ = lake_ensemble_errors(learners, tasks, k)
            errors[str(k)] = {"seeds": [w / n for w, n, _ in per_seed], "ensemble": wrong / total, "items": total}
            print(folder, k, errors[str(k)], flush=True)
        scores[folder] = errors
    return {
        "runs": [str(r) for r in runs],
        "seeds": seeds,
        "iterations": [int(state.get("iteration", learner.iteration)) for _, learner, state in members],
        "train_min": [round(float(state.get("elapsed", 0.0)) / 60, 1) for _, _, state in members],
        "scores": scores,
    }


def write_report(results: dict[str, Any], docs: Path) -> None:
    lines = [
        "# Omniglot one-shot: seeds and ensembles",
        "",
        "Produced by `python benchmarks/lake_seeds.py` (see its docstring): one recipe trained once per seed,",
        "each run's final checkpoint scored on Lake-format runs (20-way 1-shot within one alphabet, 20 test",
        "items per run) written by `metaopt lake-runs` from alphabets the training archive lacks; mean ±",
        "sample standard deviation over seeds, and the seeds' runs as one ensemble (mean softmax",
        "probability over the members, each adapted to the run on its own). Train minutes are each run's",
        "own clock; an ensemble costs the sum of its members' training (side by side on the 2 cores:",
        "the longest member's wall time).",
        "",
    ]
    for name, row in results.items():
        lines += [f"## {name}", "", f"Command: `{row['command']}`", ""]
        lines += [f"Device: {row['device']}; scored {row['scored']}. Seeds {row['seeds']}, iterations "]
        lines[-1] += f"{row['iterations']}, train minutes {row['train_min']}."
        lines += ["", "| Lake runs | test steps | items | error per seed | mean ± sd | ensemble of the seeds |"]
        lines += ["| --- | --- | --- | --- | --- | --- |"]
        for folder, errors in row["scores"].items():
            for k, e in errors.items():
                mean, sd = summary(e["seeds"])
                per_seed = ", ".join(f"{100 * v:.2f}%" for v in e["seeds"])
                cells = [f"`{folder}`", k, str(e["items"]), per_seed, f"{100 * mean:.2f}% ± {100 * sd:.2f}"]
                lines.append("| " + " | ".join([*cells, f"**{100 * e['ensemble']:.2f}%**"]) + " |")
        if row.get("note"):
            lines += ["", row["note"]]
        lines.append("")
    (docs / "lake_seeds.md").write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", required=True, help="one training run per seed (the same recipe)")
    parser.add_argument("--lake-runs", nargs="+", required=True, help="folders of Lake-format runs")
    parser.add_argument("--steps", type=int, nargs="+", default=[0])
    parser.add_argument("--name", required=True, help="section name, e.g. 'small1->small2, proto recipe'")
    parser.add_argument("--command", default="", help="the training command, for the record")
    parser.add_argument("--note", default=None, help="what the section shows (kept with it)")
    parser.add_argument("--docs", default=str(DOCS))
    args = parser.parse_args()
    docs = Path(args.docs)
    path = docs / "lake_seeds.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    row = score([Path(r) for r in args.runs], args.lake_runs, args.steps)
    results[args.name] = {"command": args.command, "device": device_name(), "scored": time.strftime("%Y-%m-%d %H:%M")}
    results[args.name].update(row, note=args.note)
    write_json(path, results)
    write_report(results, docs)


if __name__ == "__main__":
    main()
