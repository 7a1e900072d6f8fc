"""The ``metaopt`` command: ``train``, ``eval``, ``plugins``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from metaopt.config import DATA_SYNTAX, RESUME_SAFE_KEYS
from metaopt.errors import MetaOptError, TrainingInterrupted

_LIST_FLAGS = {"plugins": "plugin", "test_alphabets": "test_alphabet", "log_with": "log_with"}
DEFAULT_OUT = "runs/default"
DISTRIBUTION = "metaopt-torch"  # the PyPI name ("metaopt" there is an unrelated project); import name: metaopt


CHECKPOINT_HELP = (
    "which weights: latest (default: the newest intact checkpoint), best (RUN/best.pt, kept with --keep-best) "
    "or a checkpoint file of the run"
)


def _version() -> str:
    import metaopt

    return f"{metaopt.__version__} (distribution {DISTRIBUTION})"


def _bool_value(text: str) -> bool:
    """true/false, yes/no, on/off, 1/0 (``bool("false")`` is True: never used for a flag)."""
    word = text.strip().lower()
    if word in ("true", "yes", "on", "1"):
        return True
    if word in ("false", "no", "off", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false; got {text!r}")


def _json_value(text: str) -> Any:
    """A flag's JSON value (the config check then requires an object)."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {text[:80]!r} ({str(exc)[:80]})") from exc


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    from metaopt.config import FIELD_CHOICES, FIELD_HELP, TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        hint = hints[f.name]
        flag = "--" + _LIST_FLAGS.get(f.name, f.name).replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        # the help names its own default, or says what unset means
        said = (
            f.name == "inner_lr"
            or "(default:" in FIELD_HELP[f.name]
            or (default is None and "unset" in FIELD_HELP[f.name])
        )
        help_text = FIELD_HELP[f.name] + ("" if said else f" (default: {default!r})")
        if f.name in _LIST_FLAGS:
            parser.add_argument(
                flag,
                dest=f.name,
                action="append",
                default=argparse.SUPPRESS,
                help=FIELD_HELP[f.name] + "; repeatable",
            )
        elif hint is bool:
            parser.add_argument(
                flag, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text
            )
        elif f.name in ("outer_optimizer_kwargs", "param_group_lr"):
            parser.add_argument(flag, dest=f.name, type=_json_value, default=argparse.SUPPRESS, help="JSON object")
        else:
            base = (
                [a for a in typing.get_args(hint) if a is not type(None)]
                if isinstance(hint, types.UnionType)
                else [hint]
            )
            parser.add_argument(
                flag,
                dest=f.name,
                type=_bool_value if base[0] is bool else base[0],
                default=argparse.SUPPRESS,
                help=help_text,
                choices=FIELD_CHOICES.get(f.name),
            )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metaopt", description="Plugin-based gradient meta-learning.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser(
        "train",
        help="meta-train a model (default: conv4 on built-in synthetic glyphs)",
        description="Meta-train a model with algorithm plugins. Every flag is also a config-file key "
        "(--config); flags override the file. --data: " + DATA_SYNTAX,
    )
    train.add_argument("--config", help="YAML or JSON file of settings; flags override it")
    train.add_argument("--out", help=f"run directory (default: the config's `out`, else {DEFAULT_OUT})")
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its latest checkpoint, with its saved config; flags may change "
        + ", ".join(RESUME_SAFE_KEYS),
    )
    train.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    train.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    _add_config_flags(train)

    ev = sub.add_parser("eval", help="evaluate a trained run on fresh tasks")
    ev.add_argument("run_dir")
    ev.add_argument("--data", help="data source (default: the run's)")
    ev.add_argument("--split", default="test", help="train, test or all (default: test)")
    ev.add_argument("--tasks", type=int, default=600, help="number of test tasks (default: 600)")
    ev.add_argument("--checkpoint", default="latest", help=CHECKPOINT_HELP)
    ev.add_argument("--steps", type=int, help="inner steps at test time (default: the run's)")
    ev.add_argument("--seed", type=int, help="task seed (default: derived from the run's seed)")
    ev.add_argument(
        "--test-alphabet",
        dest="test_alphabets",
        action="append",
        help="repeatable; Omniglot alphabets of the test split (default: the run's)",
    )
    ev.add_argument("--ways", type=int, help="classes per test task (default: the run's)")
    ev.add_argument("--shots", type=int, help="support examples per class (default: the run's)")
    ev.add_argument("--query", type=int, help="query examples per class (default: the run's)")
    ev.add_argument("--no-baseline", action="store_true", help="skip the unadapted (0-step) baseline: half the time")
    ev.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.add_argument(
        "--lake-runs",
        metavar="PATH",
        help="evaluate on a folder of Omniglot one-shot runs (runNN/class_labels.txt ...); reports the error rate",
    )
    ev.add_argument(
        "--ensemble",
        metavar="RUN_DIR",
        action="append",
        default=[],
        help="repeatable, with --lake-runs: score RUN_DIR and these runs as one ensemble (mean softmax probability)",
    )

    lk = sub.add_parser("lake-runs", help="write Omniglot one-shot runs (official format) from held-out alphabets")
    lk.add_argument("--omniglot", required=True, help="an images_background*.zip archive")
    lk.add_argument("--alphabet", dest="alphabets", action="append", required=True, help="repeatable")
    lk.add_argument("--out", required=True)
    lk.add_argument("--runs", type=int, default=20)
    lk.add_argument("--ways", type=int, default=20)
    lk.add_argument("--seed", type=int, default=0)

    ex = sub.add_parser(
        "export", help="write a run's meta-learned weights as a plain state dict (timm key names for timm models)"
    )
    ex.add_argument("run_dir")
    ex.add_argument("--out", help="weights file (default: RUN/export/model.pt)")
    ex.add_argument("--checkpoint", default="latest", help=CHECKPOINT_HELP)

    pl = sub.add_parser("plugins", help="list available plugins")
    pl.add_argument("--json", action="store_true")
    sub.add_parser("hooks", help="print the hook reference (Markdown, from the hook specs)")
    return parser


def cmd_train(args: argparse.Namespace) -> int:
    from metaopt.config import TrainConfig, load_config_file
    from metaopt.trainer import Trainer

    from_file: dict[str, Any] = load_config_file(args.config) if args.config else {}
    file_out = from_file.pop("out", None)
    out = args.out or file_out or DEFAULT_OUT
    meta = {"config", "out", "resume", "overwrite", "no_progress", "command"}
    flags = {k: v for k, v in vars(args).items() if k not in meta}
    values = merge_settings(from_file, flags)
    if args.resume:
        values = resume_settings(Path(out), values)
    config = TrainConfig.from_dict(values)
    trainer = Trainer(config, out, resume=args.resume, overwrite=args.overwrite)
    trainer.train(progress=not args.no_progress)
    if trainer.is_main:
        print(f"{trainer.summary()} -> {out}")
    return 0


def merge_settings(from_file: dict[str, Any], flags: dict[str, Any]) -> dict[str, Any]:
    """Flags override the config file; ``--plugin`` flags add to the file's plugins, and one that
    names a plugin already there replaces that entry (so its options can be changed)."""
    from metaopt.config import plugin_specs

    values = {**from_file, **flags}
    if "plugins" in from_file and "plugins" in flags:
        named = {name for name, _ in plugin_specs(flags["plugins"])}
        kept = [
            p for p, (name, _) in zip(from_file["plugins"], plugin_specs(from_file["plugins"])) if name not in named
        ]
        values["plugins"] = kept + list(flags["plugins"])
    return values


def resume_settings(run_dir: Path, given: dict[str, Any]) -> dict[str, Any]:
    """The run's saved config with ``given`` on top (the Trainer refuses keys that may not change)."""
    from metaopt.trainer import run_settings

    return {**run_settings(run_dir), **given}


def cmd_eval(args: argparse.Namespace) -> int:
    from metaopt.data.record import check_unchanged, read_record, split_record, warn_if_trained_on
    from metaopt.rundir import DATA_FILE
    from metaopt.trainer import (
        checkpoint_path,
        evaluate,
        load_checkpoint,
        load_run,
        make_eval_sampler,
        median_note,
        metric_key,
    )

    if args.tasks < 1:
        raise MetaOptError(f"--tasks {args.tasks} must be >= 1.")
    if args.ensemble and not args.lake_runs:
        raise MetaOptError(f"--ensemble {args.ensemble[0]!r} needs --lake-runs (ensembles score one-shot runs).")
    if args.ensemble and args.checkpoint not in ("latest", "best"):
        raise MetaOptError(
            f"--checkpoint {args.checkpoint!r} is one run's file; with --ensemble give latest or best, which every "
            "member then uses."
        )
    config, learner, state = load_checkpoint(args.run_dir, checkpoint_path(args.run_dir, args.checkpoint))
    if args.lake_runs:
        return _eval_lake(args, [(config, learner), *(load_run(run, args.checkpoint) for run in args.ensemble)])

    def sampler():
        return make_eval_sampler(
            config,
            data=args.data,
            split=args.split,
            seed=args.seed,
            test_alphabets=args.test_alphabets,
            ways=args.ways,
            shots=args.shots,
            query=args.query,
            model=learner.model,
        )

    bar = None if args.no_progress else "adapted"
    tasks = sampler()
    if args.data is None:  # the run's own data: is it still what it trained on?
        saved, current = read_record(Path(args.run_dir) / DATA_FILE), split_record(tasks)
        if args.test_alphabets is None:
            check_unchanged(saved, args.split, current, "this evaluation")
        if args.split == "test":
            chosen = "the test split" if args.test_alphabets is None else "--test-alphabet"
            warn_if_trained_on(saved, current, chosen)
    report = evaluate(learner, tasks, args.tasks, steps=args.steps, progress=bar)
    key = metric_key(report)
    baseline = None
    if not args.no_baseline:
        baseline = evaluate(learner, sampler(), args.tasks, steps=0, progress=bar and "unadapted")
        report["unadapted"] = {key: baseline[key], "ci95": baseline["ci95"]}
    report["data"] = args.data or config.data
    report["split"] = args.split
    report["checkpoint"] = args.checkpoint
    report["iteration"] = int(state["iteration"])  # which weights were scored
    if args.json:
        print(json.dumps(report))
    else:
        print(
            f"{key} after {report['steps']} steps: {report[key]:.4f} ± {report['ci95']:.4f} "
            f"over {report['tasks']} tasks{median_note(report)}, weights of iteration {report['iteration']}"
            + ("" if baseline is None else f" (unadapted: {baseline[key]:.4f})")
        )
    return 0


def _eval_lake(args: argparse.Namespace, members: list[tuple[Any, Any]]) -> int:
    from metaopt.data.lake import lake_ensemble_errors, lake_errors, read_lake_runs_per_member

    tasks = read_lake_runs_per_member(args.lake_runs, [config.image_size for config, _ in members])
    learners = [learner for _, learner in members]
    if len(members) == 1:
        wrong, total, per_run = lake_errors(learners[0], tasks[0], args.steps)
    else:
        wrong, total, per_run = lake_ensemble_errors(learners, tasks, args.steps)
    own = [learner.eval_inner_steps for learner in learners]
    report = {
        "runs": len(per_run),
        "items": total,
        "error_rate": wrong / total,
        "per_run_error": per_run,
        "steps": (own[0] if len(set(own)) == 1 else own) if args.steps is None else args.steps,
        "lake_runs": args.lake_runs,
        "members": [args.run_dir, *args.ensemble],
    }
    if args.json:
        print(json.dumps(report))
    else:
        ensemble = f" (ensemble of {len(members)} runs)" if len(members) > 1 else ""
        print(f"error rate {report['error_rate']:.4f} over {len(per_run)} runs ({total} test items){ensemble}")
    return 0


def cmd_lake_runs(args: argparse.Namespace) -> int:
    from metaopt.data.lake import write_lake_runs

    manifest = write_lake_runs(args.omniglot, args.alphabets, args.out, runs=args.runs, ways=args.ways, seed=args.seed)
    used = sorted({r["alphabet"] for r in manifest["runs"]})
    skipped = f"; skipped {manifest['skipped']}" if manifest["skipped"] else ""
    print(f"wrote {len(manifest['runs'])} runs from {used} to {args.out}{skipped}")
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    from metaopt.registry import list_plugins

    plugins = list_plugins()
    if args.json:
        print(json.dumps(plugins))
        return 0
    width = max((len(n) for n in plugins), default=0)
    for name, description in plugins.items():
        print(f"{name:<{width}}  {description}")
        options = plugin_options(name)
        if options:
            print(" " * (width + 2) + "options: " + ", ".join(f"{k}={v!r}" for k, v in options.items()))
    return 0


def plugin_options(name: str) -> dict[str, Any]:
    """A registered plugin's options with their defaults (from its signature)."""
    import inspect

    from metaopt.errors import PluginError
    from metaopt.registry import plugin_entry

    try:
        signature = inspect.signature(plugin_entry(name).factory)
    except (TypeError, ValueError, PluginError):  # a broken entry point is listed as such, without options
        return {}
    empty = inspect.Parameter.empty
    return {k: (None if p.default is empty else p.default) for k, p in signature.parameters.items() if k != "self"}


def cmd_export(args: argparse.Namespace) -> int:
    from metaopt.export import export_run

    path = export_run(args.run_dir, args.out, args.checkpoint)
    how = json.loads(path.with_suffix(".json").read_text())
    chosen = how["checkpoint"]
    print(
        f"wrote {path}, the weights at iteration {chosen['iteration']} ({chosen['chosen']} checkpoint; how to load "
        f"them: {path.with_suffix('.json')})"
    )
    print(f"load: {how['load']}")
    if "after_load" in how:
        print(f"then: {how['after_load']}  # BatchNorm: {how['batchnorm']}")
    inputs = how["inputs"]
    norm = inputs["normalize"]
    scaling = (
        "then (x - mean) / std with mean " + str(norm["mean"]) + ", std " + str(norm["std"])
        if norm
        else "no normalisation"
    )
    print(f"inputs: {inputs['shape']} {inputs['dtype']}, {scaling}")
    steps = how["adaptation"]
    names = ", ".join(p["name"] for p in steps["plugins"]) or "none"
    print(
        f"adapts with: {steps['inner_steps']} {steps['inner_optimizer']} steps at inner_lr {steps['inner_lr']}, "
        f"plugins: {names}"
    )
    if "plugin_modules" in how:
        modules = how["plugin_modules"]
        print(
            f"plugin modules ({', '.join(modules['modules'])}) -> {modules['file']}: the run adapts with them; the "
            "weights alone adapted with inner_lr are another learner (metaopt.trainer.load_run(RUN) rebuilds it whole)"
        )
    return 0


def cmd_hooks(args: argparse.Namespace) -> int:
    from metaopt.hookspecs import reference_markdown

    print(reference_markdown())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    commands = {
        "train": cmd_train,
        "eval": cmd_eval,
        "plugins": cmd_plugins,
        "hooks": cmd_hooks,
        "lake-runs": cmd_lake_runs,
        "export": cmd_export,
    }
    try:
        return commands[args.command](args)
    except TrainingInterrupted as exc:
        print(f"metaopt: {exc}", file=sys.stderr)
        return 128 + exc.signal_number
    except MetaOptError as exc:
        print(f"metaopt: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("metaopt: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
