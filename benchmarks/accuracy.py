"""Accuracy harness: every algorithm plugin on the same tasks and seeds, through the CLI.

    python benchmarks/accuracy.py                       # everything (hours on a CPU)
    python benchmarks/accuracy.py --section sinusoid --shots 10 --sin-iters 3000
    python benchmarks/accuracy.py --section omniglot --ways 5 --algorithms maml fomaml

Rows are added to docs/benchmarks/accuracy.json as they finish (a row already there is kept
unless --rerun), and docs/benchmarks/accuracy.md plus PNG plots are regenerated from that file
after every row: every number in the Markdown comes from a run of this script.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from algorithms import ALGORITHMS, algorithm_flags
from common import DOCS, ROOT, SHARED_DATA, cli, device_name, fmt, shown, train_eval, write_json
from recipe_knobs import columns_of, seed_table
from seeds import INTRO, seed_tables

OUTPUT = {"docs": DOCS}  # where the JSON, Markdown and plots go (--docs)

# cross-split Omniglot: (train archive, test archive, alphabets of the test archive not in the train one)
CROSS_SPLITS = {
    "small1->small2": (
        "images_background_small1.zip",
        "images_background_small2.zip",
        ["Japanese_(katakana)", "Sanskrit", "Tagalog"],
    ),
    "small2->small1": (
        "images_background_small2.zip",
        "images_background_small1.zip",
        ["Balinese", "Early_Aramaic", "Korean"],
    ),
}
# MAML paper settings per way count: inner steps, inner lr, meta-batch, query per class (flags override
# steps, meta-batch and query for CPU budgets)
OMNI_SETTINGS = {5: (1, 0.4, 32, 15), 20: (5, 0.1, 16, 15)}


def sinusoid_rows(args: argparse.Namespace) -> list[tuple[str, list[str], list[int], list[str]]]:
    rows = []
    for shots in args.shots:
        base = ["--data", "sinusoid", "--shots", str(shots), "--query", str(shots), "--inner-lr", "0.01"]
        base += ["--inner-steps", "1", "--meta-batch", "25", "--iterations", str(args.sin_iters)]
        base += ["--seed", str(args.seed), "--checkpoint-every", "0"]
        for algo in args.algorithms:
            key = f"sinusoid/{shots}-shot/{algo}"
            rows.append((key, base + algorithm_flags(algo, args.sin_iters), [1, 10], []))
    return rows


def omniglot_rows(args: argparse.Namespace) -> list[tuple[str, list[str], list[int], list[str]]]:
    rows = []
    for direction, (train_zip, test_zip, alphabets) in CROSS_SPLITS.items():
        if direction not in args.directions:
            continue
        for ways in args.ways:
            steps, lr, batch, query = OMNI_SETTINGS[ways]
            steps, query = (args.omni_steps or steps), (args.omni_query or query)
            config = Path(args.work) / f"omniglot-{direction}.yaml"
            config.parent.mkdir(parents=True, exist_ok=True)
            config.write_text("test_alphabets: []\n")  # meta-train on every alphabet of the train archive
            base = ["--config", str(config), "--data", f"omniglot:{Path(args.omniglot) / train_zip}"]
            base += ["--ways", str(ways), "--shots", "1", "--query", str(query), "--inner-steps", str(steps)]
            base += ["--inner-lr", str(lr), "--meta-batch", str(args.omni_meta_batch or batch)]
            base += ["--iterations", str(args.omni_iters), "--seed", str(args.seed), "--checkpoint-every", "0"]
            eval_args = ["--data", f"omniglot:{Path(args.omniglot) / test_zip}", "--split", "test"]
            for alphabet in alphabets:
                eval_args += ["--test-alphabet", alphabet]
            for algo in args.algorithms:
                key = f"omniglot/{direction}/{ways}-way-1-shot/{algo}"
                rows.append((key, base + algorithm_flags(algo, args.omni_iters), [steps, *args.eval_steps], eval_args))
    return rows


def lake_rows(args: argparse.Namespace) -> list[tuple[str, list[str], list[int], list[str]]]:
    """20-way models meta-trained on small1, scored on one-shot runs written from small2's held-out alphabets."""
    train_zip, test_zip, alphabets = CROSS_SPLITS["small1->small2"]
    runs = Path(args.work) / "lake-runs-small2"
    if not (runs / "runs.json").is_file():
        write = ["lake-runs", "--omniglot", str(Path(args.omniglot) / test_zip), "--out", str(runs)]
        for alphabet in alphabets:
            write += ["--alphabet", alphabet]
        cli(write + ["--runs", "20", "--seed", str(args.seed)])
    config = Path(args.work) / "omniglot-all-alphabets.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text("test_alphabets: []\n")
    base = ["--config", str(config), "--data", f"omniglot:{Path(args.omniglot) / train_zip}", "--ways", "20"]
    base += ["--shots", "1", "--query", "5", "--inner-steps", str(args.lake_steps), "--inner-lr", "0.1"]
    base += ["--meta-batch", str(args.lake_meta_batch), "--iterations", str(args.omni_iters)]
    base += ["--seed", str(args.seed), "--checkpoint-every", "0"]
    return [
        (
            f"lake/small1->small2 runs/20-way-1-shot/{algo}",
            base + algorithm_flags(algo, args.omni_iters),
            [args.lake_steps, *args.eval_steps],
            ["--lake-runs", str(runs)],
        )
        for algo in args.algorithms
    ]


def _without_config(train_args: list[str]) -> list[str]:
    """Training flags minus the ``--config`` path (every generated config holds `test_alphabets: []`)."""
    if "--config" not in train_args:
        return list(train_args)
    at = train_args.index("--config")
    return train_args[:at] + train_args[at + 2 :]


def trained_twin(results: dict[str, Any], train_args: list[str], folders: list[Path]) -> tuple[str, Path] | None:
    """An earlier row trained with the same flags whose run folder still exists: (its key, its run)."""
    wanted = _without_config(train_args)
    for key, row in results.items():
        if _without_config(row["train_args"]) != wanted or "model_of" in row:
            continue
        for folder in folders:
            run = folder / key.replace("/", "_")
            if (run / "config.json").is_file() and any((run / "checkpoints").glob("*.pt")):
                return key, run
    return None


def write_report(results: dict[str, Any]) -> None:
    lines = [
        "# Accuracy benchmark",
        "",
        "Produced by `python benchmarks/accuracy.py` (see its `--help`); rows are added as runs finish.",
        "Every algorithm in a table shares the data, seeds and training length of its rows; test tasks are",
        "fresh tasks (sinusoid: a different seed; Omniglot: alphabets never seen in training), the same",
        "tasks for every row of a table.",
        "± is the 95% confidence half-width (1.96 standard errors over tasks). 'unadapted' is the",
        "meta-learned initialisation evaluated with 0 inner steps on the same test tasks.",
        "",
    ]
    groups: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for key, row in results.items():
        group, algo = key.rsplit("/", 1)
        groups.setdefault(group, []).append((algo, row))
    lines += summary_tables(groups)
    lines += over_seeds()
    for group, rows in groups.items():
        first = rows[0][1]
        steps = list(first["evals"])
        if "error_rate" in first["evals"][steps[0]]:
            lines += lake_table(group, rows, steps)
            continue
        metric = "accuracy" if "accuracy" in first["evals"][steps[0]] else "MSE"
        tasks = first["evals"][steps[0]]["tasks"]
        lines += [f"## {group}", "", f"Metric: {metric} over {tasks} test tasks after the given inner steps.", ""]
        header = "| algorithm | options | iterations | train wall (s) | device | unadapted | "
        header += " | ".join(f"{s} step{'s' if s != '1' else ''}" for s in steps) + " |"
        lines += [header, "|" + " --- |" * (6 + len(steps))]
        for algo, row in rows:
            evals = row["evals"]
            options = " ".join(row["train_args"][row["train_args"].index("--checkpoint-every") + 2 :]) or "(defaults)"
            wall = _train_wall(row)
            cells = [algo, f"`{options}`", str(row["iterations"]), wall, row["device"]]
            base = next((e["unadapted"] for e in evals.values() if "unadapted" in e), None)
            cells.append("—" if base is None else f"{base[list(base)[0]]:.4f} ± {base['ci95']:.4f}")
            cells += [fmt(evals[s]) for s in steps]
            lines.append("| " + " | ".join(cells) + " |")
        common = first["train_args"][: first["train_args"].index("--checkpoint-every")]
        if "--config" in common:  # a generated file holding only `test_alphabets: []`
            common = _without_config(common)
            lines += ["", "Meta-trained on every alphabet of the train archive (`test_alphabets: []`)."]
        lines += ["", f"Shared training flags: `{shown(' '.join(common))}`", ""]
        plot = plot_group(group, rows, steps[-1])
        if plot:
            lines += [f"![{group}]({plot})", ""]
    (OUTPUT["docs"] / "accuracy.md").write_text("\n".join(lines))


def over_seeds() -> list[str]:
    """The over-seed tables, where they exist: benchmarks/seeds.py's (docs/benchmarks/seeds.json) and the
    seeded arms of benchmarks/recipe_knobs.py's sections (docs/benchmarks/recipe_knobs.json)."""
    path, knobs = OUTPUT["docs"] / "seeds.json", OUTPUT["docs"] / "recipe_knobs.json"
    lines = []
    if path.is_file():
        lines += ["These are several seeds per algorithm, from `docs/benchmarks/seeds.md`:", "", *INTRO]
        lines += seed_tables(json.loads(path.read_text()), level="###")
    for name, block in (json.loads(knobs.read_text()) if knobs.is_file() else {}).items():
        table = seed_table(block["arms"], columns_of(block["arms"]))
        if table:  # the one-shot recipe with plugins added, several seeds (recipe_knobs.py)
            source = (
                f"From `docs/benchmarks/recipe_knobs.md`: error on Lake-format runs at iteration {block['stop_at']}"
            )
            lines += [f"### {name}", "", f"{source} (device: {block['device']}).", ""]
            lines += [*table, *([block["note"], ""] if block.get("note") else [])]
    if not lines:
        return []
    return ["## Plugin effects over seeds", "", "The per-setting tables further down are one seed each.", *lines]


def _train_wall(row: dict[str, Any]) -> str:
    """The row's training wall time, naming the row whose trained model it reuses."""
    return str(row["train_wall_s"]) + (f" (model of `{row['model_of']}`)" if "model_of" in row else "")


def summary_tables(groups: dict[str, list[tuple[str, dict[str, Any]]]]) -> list[str]:
    """Side-by-side tables (algorithm x setting) of the per-group results below: sinusoid MSE per
    shot count, Omniglot accuracy (%) per direction for each way count; first / last eval steps."""
    families: dict[str, list[str]] = {}  # summary title -> its groups
    for group, rows in groups.items():
        evals = rows[0][1]["evals"]
        if "error_rate" in next(iter(evals.values())):
            continue
        section, *rest = group.split("/")
        title = f"{section}, {rest[-1]}" if section == "omniglot" else section
        families.setdefault(title, []).append(group)
    lines = []
    for title, members in families.items():
        first_steps = list(groups[members[0]][0][1]["evals"])
        cross = title.startswith("omniglot")
        unit = "accuracy (%)" if cross else "MSE"
        columns = [m.split("/")[1] for m in members]
        lines += [f"## Summary: {title}", "", f"{unit} after {first_steps[0]} / {first_steps[-1]} inner steps, "]
        lines[-1] += "from the tables below (± there); — = not run."
        lines += ["", "| algorithm | " + " | ".join(columns) + " |", "|" + " --- |" * (1 + len(columns))]
        by_algo = [dict(groups[member]) for member in members]
        for algo in ALGORITHMS:
            cells = []
            for rows in by_algo:
                if algo not in rows:
                    cells.append("—")
                    continue
                evals = list(rows[algo]["evals"].values())
                ends = (evals[0], evals[-1])
                cells.append(" / ".join(_summary_cell(e, cross) for e in ends))
            if any(c != "—" for c in cells):
                lines.append(f"| {algo} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _summary_cell(report: dict[str, Any], cross: bool) -> str:
    if report.get("diverged"):
        return "diverged"
    return f"{100 * report['accuracy']:.1f}" if cross else f"{report['mse']:.3f}"


def lake_table(group: str, rows: list[tuple[str, dict[str, Any]]], steps: list[str]) -> list[str]:
    first = rows[0][1]["evals"][steps[0]]
    lines = [
        f"## {group}",
        "",
        f"Error rate over {first['runs']} one-shot runs ({first['items']} test items) in the official run format,",
        "written by `metaopt lake-runs` from the held-out alphabets (`runs.json` in the run folder lists them).",
    ]
    lines += ["", "| algorithm | options | iterations | train wall (s) | device | "]
    lines[-1] += " | ".join(f"error, {s} step{'s' if s != '1' else ''}" for s in steps) + " |"
    lines += ["|" + " --- |" * (5 + len(steps))]
    for algo, row in rows:
        options = " ".join(row["train_args"][row["train_args"].index("--checkpoint-every") + 2 :]) or "(defaults)"
        wall = _train_wall(row)
        cells = [algo, f"`{options}`", str(row["iterations"]), wall, row["device"]]
        cells += [f"{row['evals'][s]['error_rate']:.4f}" for s in steps]
        lines.append("| " + " | ".join(cells) + " |")
    common = _without_config(rows[0][1]["train_args"][: rows[0][1]["train_args"].index("--checkpoint-every")])
    lines += ["", "Meta-trained on every alphabet of small1 (`test_alphabets: []`).", ""]
    lines += [f"Shared training flags: `{shown(' '.join(common))}`", ""]
    return lines


def plot_group(group: str, rows: list[tuple[str, dict[str, Any]]], steps: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    names = [algo for algo, _ in rows]
    reports = [row["evals"][steps] for _, row in rows]
    key = "accuracy" if any("accuracy" in r for r in reports) else "mse"
    fig, ax = plt.subplots(figsize=(max(4, 0.8 * len(names)), 3))
    values = [float("nan") if r.get("diverged") else r[key] for r in reports]  # a diverged row has no bar
    errors = [0.0 if r.get("diverged") else r["ci95"] for r in reports]
    ax.bar(names, values, yerr=errors, capsize=3, color="tab:blue")
    ax.set_ylabel(f"{key} after {steps} step(s)")
    ax.set_title(group)
    ax.tick_params(axis="x", labelrotation=45)
    fig.tight_layout()
    name = "accuracy-" + group.replace("/", "_").replace(">", "").replace(" ", "") + ".png"
    fig.savefig(OUTPUT["docs"] / name, dpi=100)
    plt.close(fig)
    return name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--section", choices=["sinusoid", "omniglot", "lake", "all"], default="all")
    parser.add_argument("--eval-steps", type=int, nargs="+", default=[10], help="Omniglot/Lake extra test steps")
    parser.add_argument("--lake-steps", type=int, default=1, help="inner steps of the 20-way Lake models")
    parser.add_argument("--lake-meta-batch", type=int, default=4)
    parser.add_argument("--merge", nargs="*", default=[], help="other accuracy.json files to fold in (report only)")
    parser.add_argument("--algorithms", nargs="+", default=ALGORITHMS.names(), choices=ALGORITHMS.names())
    parser.add_argument("--shots", nargs="+", type=int, default=[5, 10], help="sinusoid K")
    parser.add_argument("--sin-iters", type=int, default=10000)
    parser.add_argument("--omniglot", default=str(SHARED_DATA))
    parser.add_argument("--directions", nargs="+", default=list(CROSS_SPLITS), choices=list(CROSS_SPLITS))
    parser.add_argument("--ways", nargs="+", type=int, default=[5, 20], choices=list(OMNI_SETTINGS))
    parser.add_argument("--omni-iters", type=int, default=2000)
    parser.add_argument("--omni-meta-batch", type=int, default=None, help="default: the MAML paper's")
    parser.add_argument("--omni-steps", type=int, default=None, help="inner steps (default: the MAML paper's)")
    parser.add_argument("--omni-query", type=int, default=None, help="query images per class (default 15)")
    parser.add_argument(
        "--runs-from",
        nargs="*",
        default=[],
        help="earlier --work folders: a row whose training flags equal an earlier row's reuses that trained run",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tasks", type=int, default=600)
    parser.add_argument("--work", default=str(ROOT / "runs" / "accuracy"))
    parser.add_argument("--rerun", action="store_true", help="redo rows already in accuracy.json")
    parser.add_argument("--report-only", action="store_true", help="rewrite accuracy.md from accuracy.json")
    parser.add_argument("--docs", default=str(DOCS), help="output folder (default: docs/benchmarks)")
    args = parser.parse_args()
    OUTPUT["docs"] = Path(args.docs)
    results_file = OUTPUT["docs"] / "accuracy.json"

    results: dict[str, Any] = json.loads(results_file.read_text()) if results_file.is_file() else {}
    if args.report_only:
        write_report(results)
        return
    rows = []
    if args.section in ("sinusoid", "all"):
        rows += sinusoid_rows(args)
    for extra in args.merge:
        for key, row in json.loads(Path(extra).read_text()).items():
            results.setdefault(key, row)
    has_omniglot = (Path(args.omniglot) / "images_background_small1.zip").is_file()
    if args.section in ("omniglot", "lake", "all") and not has_omniglot:
        print(f"Omniglot skipped: no archives in {args.omniglot}")
    elif args.section in ("omniglot", "all"):
        rows += omniglot_rows(args)
    if has_omniglot and args.section in ("lake", "all"):
        rows += lake_rows(args)
    for key, train_args, steps, eval_args in rows:
        if key in results and not args.rerun:
            continue
        started = time.strftime("%Y-%m-%d %H:%M")
        shared = trained_twin(results, train_args, [Path(args.work), *map(Path, args.runs_from)])
        if shared is None:
            row = train_eval(Path(args.work) / key.replace("/", "_"), train_args, steps, args.tasks, eval_args)
            extra = {}
        else:
            twin, run = shared
            row = train_eval(run, train_args, steps, args.tasks, eval_args, train=False)
            row["train_wall_s"] = results[twin]["train_wall_s"]
            extra = {} if twin == key else {"model_of": twin, "device": results[twin]["device"]}
        iterations = int(train_args[train_args.index("--iterations") + 1])
        results[key] = {**row, "iterations": iterations, "device": device_name(), "started": started, **extra}
        write_json(results_file, results)
        write_report(results)
        shown = {s: (f"error {e['error_rate']:.4f}" if "error_rate" in e else fmt(e)) for s, e in row["evals"].items()}
        print(key, shown, f"{row['train_wall_s']} s", flush=True)
    if results:
        write_json(results_file, results)
        write_report(results)


if __name__ == "__main__":
    main()
