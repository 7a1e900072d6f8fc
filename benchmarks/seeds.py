"""Plugin effects over seeds: every algorithm trained with several seeds, mean ± spread per cell.

    python benchmarks/seeds.py --setting sinusoid --seeds 0 1 2            # plugins at the sinusoid setting
    python benchmarks/seeds.py --setting sinusoid --algorithms "maml (loop)" "maml (vmap)"   # engines
    python benchmarks/seeds.py --setting sinusoid --algorithms convergent_fo:lr=0.03,m=0.9 maml:lr=0.03,m=0.9
                                                   # NAME:lr=..,m=..[,clip=..]: a normalized-SGD outer step

Each (setting, algorithm, seed) is trained and evaluated through the CLI (600 test tasks drawn with
one fixed test seed, the same for every row), and kept in docs/benchmarks/seeds.json (a cell already
there is kept unless --rerun).  docs/benchmarks/seeds.md is regenerated from that file: per cell the
mean over seeds ± the sample standard deviation, the per-seed values, and each plugin against MAML
(the per-seed differences, paired by seed, and their standard error).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

from algorithms import ALGORITHMS, algorithm_flags
from common import DOCS, ROOT, SHARED_DATA, device_name, paired_difference, shown, summary, train_eval, write_json

TEST_SEED = 12345
SETTINGS: dict[str, dict[str, Any]] = {
    "sinusoid": {
        "flags": ["--data", "sinusoid", "--shots", "10", "--query", "10", "--inner-lr", "0.01", "--inner-steps", "1"]
        + ["--meta-batch", "25"],
        "iterations": 2000,
        "eval_steps": [1, 10],
        "metric": "mse",
    },
    # 5-way 1-shot, meta-trained on every alphabet of small1, tested on small2's alphabets small1 lacks
    "omniglot5": {
        "flags": ["--data", f"omniglot:{SHARED_DATA / 'images_background_small1.zip'}", "--ways", "5"]
        + ["--shots", "1", "--query", "15", "--inner-lr", "0.4", "--inner-steps", "1", "--meta-batch", "8"],
        "train_config": "test_alphabets: []\n",  # meta-train on every alphabet of the archive
        "eval_args": ["--data", f"omniglot:{SHARED_DATA / 'images_background_small2.zip'}", "--split", "test"]
        + [arg for a in ("Japanese_(katakana)", "Sanskrit", "Tagalog") for arg in ("--test-alphabet", a)],
        "iterations": 300,
        "eval_steps": [1, 3],
        "metric": "accuracy",
    },
}
# the sinusoid setting scored on other tasks (validation): for tuning (convergent FO's outer step) without the test tasks
SETTINGS["sinusoid-validation"] = {**SETTINGS["sinusoid"], "test_seed": 777}
# omniglot5 with one of small1's alphabets (Korean) held out of meta-training and scored: for tuning on
# classes that neither the training nor the test tasks of omniglot5 use
# the MAML paper's sinusoid protocol at its own length (Finn et al. 2017, Appendix C): the recipe's
# 70,000 iterations, meta-batch 25, K=10 in training, one step at 0.01, Adam 1e-3; scored on 5-shot tasks
SETTINGS["sinusoid-paper"] = {
    "flags": ["--config", str(ROOT / "recipes" / "sinusoid_maml.yaml"), "--eval-every", "0"],
    "iterations": 70000,
    "eval_steps": [1, 5, 10],
    "eval_args": ["--shots", "5"],
    "metric": "mse",
    "page": "sinusoid_paper",  # its own page: docs/benchmarks/sinusoid_paper.md/.json
    "engine": "compile",  # the fastest engine here (an algorithm name's own engine suffix wins)
}
SETTINGS["omniglot5-validation"] = {
    **SETTINGS["omniglot5"],
    "train_config": "test_alphabets: [Korean]\n",
    "eval_args": ["--split", "test", "--test-alphabet", "Korean"],
    "test_seed": 777,
    "note": "Meta-trained on small1 without Korean (`test_alphabets: [Korean]`), scored on Korean tasks "
    "(`--split test --test-alphabet Korean`, test seed 777): used for tuning only.",
}


PAPER_INIT = " (paper init)"


def algorithm_args(name: str, iterations: int) -> list[str]:
    """CLI flags of an algorithm: an accuracy-harness name, "NAME (loop|vmap)", "NAME (paper init)" (the
    sinusoid MLP initialised as the MAML authors' code, ``--model mlp_paper``), or convergent FO's outer step."""
    if name.endswith(PAPER_INIT):
        return [*algorithm_args(name.removesuffix(PAPER_INIT), iterations), "--model", "mlp_paper"]
    if name.endswith((" (loop)", " (vmap)")):
        base, engine = name[:-7], name[-5:-1]
        return [*algorithm_args(base, iterations), "--engine", engine]
    if ":" in name:  # NAME:lr=0.01,m=0.9[,clip=1.0]: the normalized (or clipped) SGD outer step
        base, spec = name.split(":", 1)
        options = dict(item.split("=") for item in spec.split(","))
        kwargs = {"momentum": float(options.get("m", 0.9))}
        if "clip" in options:
            kwargs.update(mode="clip", clip=float(options["clip"]))
        flags = ["--plugin", "convergent_fo"] if base == "convergent_fo" else algorithm_flags(base, iterations)
        return [*flags, "--engine", "auto", "--outer-optimizer", "normalized_sgd", "--meta-lr", options["lr"]] + [
            "--outer-optimizer-kwargs",
            json.dumps(kwargs),
        ]
    return [*algorithm_flags(name, iterations), "--engine", "auto"]


def run_cell(setting: str, algo: str, seed: int, work: Path, iterations: int, tasks: int = 600) -> dict[str, Any]:
    spec = SETTINGS[setting]
    train = [*spec["flags"], "--iterations", str(iterations), "--seed", str(seed), "--checkpoint-every", "0"]
    train += algorithm_args(algo, iterations)
    if "engine" in spec and not algo.endswith((" (loop)", " (vmap)")):
        train += ["--engine", spec["engine"]]  # the last --engine flag wins
    if "train_config" in spec:  # the alphabets held out of meta-training
        config = work / f"{setting}.yaml"
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(spec["train_config"])
        train = ["--config", str(config), *train]
    out = work / f"{setting}_{algo}_{seed}".replace(" ", "_").replace("/", "_")
    eval_args = [*spec.get("eval_args", []), "--seed", str(spec.get("test_seed", TEST_SEED)), "--no-baseline"]
    try:
        row = train_eval(out, train, spec["eval_steps"], tasks=tasks, eval_args=eval_args)
    except RuntimeError as exc:  # a plugin the setting's engine refuses (convergent FO): the engine auto picks
        if "engine" not in spec or "cannot run this learner" not in str(exc):
            raise
        train = [*train[:-2], "--engine", "auto"]
        row = train_eval(out, train, spec["eval_steps"], tasks=tasks, eval_args=eval_args)
        row["engine_refused"] = str(exc).split("metaopt: error: ", 1)[-1].strip()
        row["engine_chosen"] = json.loads((out / "config.json").read_text()).get("engine_chosen", "?")
    row.update(device=device_name(), finished=time.strftime("%Y-%m-%d %H:%M"), iterations=iterations)
    return row


INTRO = [
    "Produced by `python benchmarks/seeds.py` (see its docstring). Each cell: the mean over training",
    "seeds ± the sample standard deviation over seeds, then the per-seed values; every seed is evaluated",
    f"on the same 600 test tasks (test seed {TEST_SEED}). 'vs maml' pairs the runs by seed (a seed fixes",
    "the initialisation and the training tasks for every algorithm): the mean of the per-seed differences",
    "to MAML ± its standard error; **measurable** marks a mean difference beyond twice its standard error",
    "(with 3 seeds a rough screen, not a significance test; better is negative for MSE, positive for accuracy). A cell",
    "with one seed shows the 95% confidence half-width over test tasks instead. Train wall times come from",
    "a machine shared with other runs (and rows trained before and after the CLI began keeping freed",
    "memory on CPU): for orientation only, not a cost comparison; `speed.md` measures cost.",
    "",
]


def value(report: dict[str, Any], metric: str) -> float:
    """A cell's metric; NaN where the evaluation diverged (a non-finite loss, no metric)."""
    return float("nan") if report.get("diverged") else report[metric]


def short(v: float) -> str:
    return f"{v:.3f}" if abs(v) < 1000 else f"{v:.1e}"


def metric_cell(reports: list[dict[str, Any]], metric: str) -> str:
    """Mean ± sd over the seeds that stayed finite, every seed's value (``diverged`` where it did not);
    one seed: its 95% interval over test tasks."""
    values = [value(r, metric) for r in reports]
    finite = [v for v in values if math.isfinite(v)]
    if len(values) == 1:
        return "diverged" if not finite else f"{finite[0]:.4f} ± {reports[0]['ci95']:.4f} (95% CI, tasks)"
    each = ", ".join(short(v) if math.isfinite(v) else "diverged" for v in values)
    if not finite:
        return f"diverged ({each})"
    if len(finite) == 1:
        return f"{short(finite[0])} ({each}; the only finite seed)"
    if min(finite) > 0 and max(finite) > 10 * min(finite):  # a seed blew up: a mean would only show it
        return f"median {short(statistics.median(finite))} ({each}; spread over {max(finite) / min(finite):.0e}×)"
    mean, sd = summary(finite)
    over = f"; over the {len(finite)} finite" if len(finite) < len(values) else ""
    return f"{mean:.4f} ± {sd:.4f} ({each}{over})"


def kept_pairs(pairs: list[tuple[float, float]], metric: str) -> list[tuple[float, float]]:
    """The (algorithm, MAML) pairs a paired difference may average: both finite and, for an error
    (``mse``), both within 10× of the smallest value of the step, the rule by which ``metric_cell``
    shows a median; one blown-up seed would otherwise make the mean difference its own value."""
    finite = [(a, b) for a, b in pairs if math.isfinite(a) and math.isfinite(b)]
    values = [v for pair in finite for v in pair if v > 0]
    if metric != "mse" or not values:
        return finite
    limit = 10 * min(values)
    return [(a, b) for a, b in finite if a <= limit and b <= limit]


def seed_tables(results: dict[str, Any], level: str = "##") -> list[str]:
    """One table per setting: mean ± spread over seeds and the paired difference to MAML."""
    lines: list[str] = []
    for setting, algos in results.items():
        spec = SETTINGS[setting]
        metric, steps = spec["metric"], [str(s) for s in spec["eval_steps"]]
        lines += [f"{level} {setting}", ""]
        if "test_seed" in spec:
            default = f"Scored on validation tasks (test seed {spec['test_seed']}), used for tuning only."
            lines += [spec.get("note", default), ""]
        first = next(iter(next(iter(algos.values())).values()))
        lines += [f"Shared flags: `{shown(' '.join(spec['flags']))} --iterations {first['iterations']}`; device: "]
        lines[-1] += f"{first['device']}; `--engine {spec.get('engine', 'auto')}` unless the name says the engine."
        lines += ["", "| algorithm | seeds | " + " | ".join(f"{metric} after {s} step(s)" for s in steps)]
        lines[-1] += " | vs maml (" + " / ".join(f"{s} step(s)" for s in steps) + ") | train wall s (mean) |"
        lines += ["|" + " --- |" * (len(steps) + 4)]
        reference = algos.get("maml")
        for algo, seeds in algos.items():
            order = sorted(seeds, key=int)
            cells = [algo, ",".join(order)]
            for s in steps:
                cells.append(metric_cell([seeds[k]["evals"][s] for k in order], metric))
            if reference is not None and algo != "maml" and len(set(seeds) & set(reference)) > 1:
                parts = []
                common = sorted(set(seeds) & set(reference), key=int)
                for s in steps:  # paired by seed: the same seed draws the same init and training tasks
                    pairs = [
                        (value(seeds[k]["evals"][s], metric), value(reference[k]["evals"][s], metric)) for k in common
                    ]
                    kept = kept_pairs(pairs, metric)
                    diffs = [a - b for a, b in kept]
                    if len(diffs) < 2:
                        parts.append(f"— ({len(common) - len(diffs)} of {len(common)} pairs diverged or blew up)")
                        continue
                    diff, se, beyond = paired_difference(diffs)
                    dropped = (
                        f" ({len(common) - len(diffs)} diverged or blown-up pair(s) left out)"
                        if len(diffs) < len(common)
                        else ""
                    )
                    parts.append(f"{diff:+.4f} ± {se:.4f}" + (" **measurable**" if beyond else "") + dropped)
                cells.append(" / ".join(parts))
            else:
                cells.append("—")
            cells.append(f"{statistics.fmean(r['train_wall_s'] for r in seeds.values()):.0f}")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        for algo, seeds in algos.items():  # the setting's engine refused these: they ran on what auto picks
            refused = next((r for r in seeds.values() if "engine_refused" in r), None)
            if refused:
                chosen = refused.get("engine_chosen", "loop")
                lines += [
                    f"{algo} ran on `--engine auto` (it chose {chosen}): `--engine {spec['engine']}` refused it: "
                    f"{refused['engine_refused']}",
                    "",
                ]
    return lines


PAPER_INTRO = [
    "The sinusoid protocol of the MAML paper (Finn et al. 2017, Appendix C) at its own length, for MAML",
    "and the other plugins, through `recipes/sinusoid_maml.yaml` (70,000 meta-iterations, meta-batch 25,",
    "K=10 support points per training task, one inner step at α = 0.01, Adam at 1e-3; an MLP 1-40-40-1)",
    "plus the plugin's flags from `benchmarks/algorithms.py`. Scored on 600 fresh 5-shot tasks (`--shots 5`,",
    "10 query points, the same tasks for every run) after 1 / 5 / 10 inner steps at α = 0.01. The paper",
    "reports MSE **0.67 / 0.38 / 0.35** for MAML on 5-shot tasks after 1 / 5 / 10 steps.",
    "",
    "Produced by `python benchmarks/seeds.py --setting sinusoid-paper --algorithms NAME ... --seeds 0 1 2 3 4`",
    "(several may run at once: each cell is merged into `sinusoid_paper.json` under a lock). Cells, spreads",
    "and the pairing by seed read as in `seeds.md`: mean ± sample standard deviation over seeds, per-seed",
    "values, and the paired difference to MAML ± its standard error. Train wall times include the compile",
    "engine's compilation and exactness gate; runs shared the 2-core machine with one other run.",
    "",
]
PAGES = {
    "seeds": ("Plugin effects over seeds", INTRO),
    "sinusoid_paper": ("The MAML paper's sinusoid protocol", PAPER_INTRO),
}


def page_of(setting: str) -> str:
    return SETTINGS[setting].get("page", "seeds")


def write_report(results: dict[str, Any], docs: Path) -> None:
    """Write the page of ``results``' settings (``seeds.md``, or the settings' own page)."""
    page = page_of(next(iter(results))) if results else "seeds"
    title, intro = PAGES[page]
    lines = [f"# {title}", "", *intro, *seed_tables(results)]
    for png in plots(results, docs):
        lines += [f"![{png}]({png})", ""]
    (docs / f"{page}.md").write_text("\n".join(lines))


def store(path: Path, setting: str, algo: str, seed: int, row: dict[str, Any]) -> dict[str, Any]:
    """Merge one cell into the page's JSON under a lock (runners may share a page) and rewrite the page."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        results = json.loads(path.read_text()) if path.is_file() else {}
        results.setdefault(setting, {}).setdefault(algo, {})[str(seed)] = row
        write_json(path, results)
        write_report(results, path.parent)
    return results


def plots(results: dict[str, Any], docs: Path) -> list[str]:
    """seeds-SETTING.png for each setting with several seeds: every algorithm's metric after each
    evaluated step count, the mean over seeds with the sample standard deviation as error bars."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    made = []
    for setting, algos in results.items():
        seeded = {a: seeds for a, seeds in algos.items() if len(seeds) > 1}
        if len(seeded) < 2:
            continue
        spec = SETTINGS[setting]
        metric, steps = spec["metric"], [str(s) for s in spec["eval_steps"]]
        fig, axes = plt.subplots(1, len(steps), figsize=(4.2 * len(steps), 0.32 * len(seeded) + 1.4), squeeze=False)
        for ax, step in zip(axes[0], steps, strict=True):
            names = list(seeded)
            finite = [
                [v for r in seeded[a].values() if math.isfinite(v := value(r["evals"][step], metric))] for a in names
            ]
            stats = [summary(f) if f else (float("nan"), 0.0) for f in finite]  # diverged seeds left out
            colours = ["tab:gray" if a == "maml" else "tab:blue" for a in names]
            ax.barh(names, [m for m, _ in stats], xerr=[sd for _, sd in stats], color=colours, capsize=3)
            if "maml" in seeded:
                ax.axvline(stats[names.index("maml")][0], color="k", lw=0.8)
            ax.set_title(f"{setting}: {metric} after {step} step(s)", fontsize=9, loc="left")
            ax.invert_yaxis()
            ax.tick_params(axis="y", labelsize=8)
        better = "higher is better" if metric == "accuracy" else "lower is better"
        fig.supxlabel(f"mean over seeds ± sd ({better}; grey and line: MAML)", fontsize=8)
        fig.tight_layout()
        name = f"seeds-{setting}.png"
        fig.savefig(docs / name, dpi=90)
        plt.close(fig)
        made.append(name)
    return made


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", choices=list(SETTINGS), default="sinusoid")
    parser.add_argument("--algorithms", nargs="+", default=["maml", "fomaml", "shot", "sharp_inner"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--iterations", type=int, help="default: the setting's")
    parser.add_argument("--work", default="runs/seeds")
    parser.add_argument("--docs", default=str(DOCS))
    parser.add_argument("--rerun", action="store_true")
    parser.add_argument("--tasks", type=int, default=600, help="test tasks per evaluation (the pages: 600)")
    args = parser.parse_args()
    for algo in args.algorithms:
        base = algo.removesuffix(PAPER_INIT).removesuffix(" (loop)").removesuffix(" (vmap)")
        if base.split(":", 1)[0] not in ALGORITHMS:
            parser.error(f"unknown algorithm {algo!r}; use one of {sorted(ALGORITHMS.names())}")
    docs = Path(args.docs)
    path = docs / f"{page_of(args.setting)}.json"
    iterations = args.iterations or SETTINGS[args.setting]["iterations"]
    for algo in args.algorithms:
        for seed in args.seeds:
            results = json.loads(path.read_text()) if path.is_file() else {}
            if str(seed) in results.get(args.setting, {}).get(algo, {}) and not args.rerun:
                continue
            row = run_cell(args.setting, algo, seed, Path(args.work), iterations, args.tasks)
            store(path, args.setting, algo, seed, row)
            print(args.setting, algo, seed, {k: v.get("mse", v.get("accuracy")) for k, v in row["evals"].items()})


if __name__ == "__main__":
    main()
