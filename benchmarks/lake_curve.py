"""Error versus training time on Omniglot one-shot runs: every checkpoint of a run, scored.

    python benchmarks/lake_curve.py RUN --lake-runs DIR [--steps 10 20] --name small1->small2

For each checkpoint kept in RUN/checkpoints (train with --keep-checkpoints large enough), the
learner is rebuilt from the run's config and scored on the Lake-format runs in DIR (20-way
1-shot within one alphabet, as `metaopt lake-runs` writes them) at each number of test steps.
Appends to docs/benchmarks/lake_curve.json and regenerates lake_curve.md and a PNG plot.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from common import DOCS, device_name, write_json


def score(run: Path, lake_runs: str, steps: list[int]) -> list[dict[str, Any]]:
    from metaopt.data.lake import lake_errors, read_lake_runs
    from metaopt.trainer import checkpoint_files, load_checkpoint

    tasks = None
    points = []
    for path in checkpoint_files(run):
        config, learner, state = load_checkpoint(run, path)
        tasks = read_lake_runs(lake_runs, size=config.image_size) if tasks is None else tasks
        errors = {}
        for k in steps:
            wrong, total, _ = lake_errors(learner, tasks, k)
            errors[str(k)] = wrong / total
        iteration = int(state.get("iteration", learner.iteration))
        point = {"iteration": iteration, "train_s": round(float(state.get("elapsed", 0.0)), 1), "error": errors}
        print(point, flush=True)
        points.append(point)
    return points


def write_report(results: dict[str, Any], docs: Path) -> None:
    lines = [
        "# Omniglot one-shot: error versus training time",
        "",
        "Produced by `python benchmarks/lake_curve.py` from the checkpoints of one training run per row:",
        "error rate on 20 Lake-format runs (20-way 1-shot, all classes of a run from one alphabet, 20 test",
        "items per run: 400 items) written by `metaopt lake-runs` from alphabets the training archive lacks.",
        "Train seconds are the run's own training clock (single process, the device named).",
        "",
    ]
    for name, row in results.items():
        steps = list(row["points"][0]["error"])
        lines += [
            f"## {name}",
            "",
            f"Command: `{row['command']}`",
            "",
            f"Device: {row['device']}; scored {row['scored']}.",
            "",
        ]
        lines += ["| iteration | train time (min) | " + " | ".join(f"error, {s} test steps" for s in steps) + " |"]
        lines += ["|" + " --- |" * (2 + len(steps))]
        for p in row["points"]:
            cells = [str(p["iteration"]), f"{p['train_s'] / 60:.1f}"] + [f"{100 * p['error'][s]:.2f}%" for s in steps]
            lines.append("| " + " | ".join(cells) + " |")
        best = min((p["error"][s], s, p["iteration"]) for p in row["points"] for s in steps)
        last = row["points"][-1]
        final = ", ".join(f"{100 * last['error'][s]:.2f}% ({s} test steps)" for s in steps)
        lines += [
            "",
            f"Final checkpoint (what the run produces): {final}. Lowest over the checkpoints: {100 * best[0]:.2f}% "
            f"after {best[2]} iterations, {best[1]} test steps (picked on these runs, so optimistic).",
            "",
        ]
    plot = _plot(results, docs)
    if plot:
        lines += [f"![error versus training time]({plot})", ""]
    (docs / "lake_curve.md").write_text("\n".join(lines))


def _plot(results: dict[str, Any], docs: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, row in results.items():
        steps = list(row["points"][0]["error"])
        s = steps[-1]
        ax.plot([p["train_s"] / 60 for p in row["points"]], [100 * p["error"][s] for p in row["points"]], marker="o")
        ax.lines[-1].set_label(f"{name} ({s} test steps)")
    ax.axhline(12, color="k", lw=0.8, ls="--", label="12% target")
    ax.set_xlabel("training time (min)")
    ax.set_ylabel("error rate (%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(docs / "lake_curve.png", dpi=90)
    plt.close(fig)
    return "lake_curve.png"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run")
    parser.add_argument("--lake-runs", required=True)
    parser.add_argument("--steps", type=int, nargs="+", default=[10])
    parser.add_argument("--name", required=True, help="row name, e.g. 'small1->small2, recipe omniglot_oneshot_small1'")
    parser.add_argument("--command", default="", help="the training command, for the record")
    parser.add_argument("--docs", default=str(DOCS))
    args = parser.parse_args()
    docs = Path(args.docs)
    path = docs / "lake_curve.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    results[args.name] = {
        "command": args.command,
        "device": device_name(),
        "scored": time.strftime("%Y-%m-%d %H:%M"),
        "points": score(Path(args.run), args.lake_runs, args.steps),
    }
    write_json(path, results)
    write_report(results, docs)


if __name__ == "__main__":
    main()
