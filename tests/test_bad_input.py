"""Bad input, case by case: every one ends in exit status 2 (or metaopt's error class) with a message
that names the offending value; none in a raw traceback, none silently accepted.

Cases cover CLI flags, config-file keys and values (YAML and JSON, encodings, aliases), data
sources, Lake runs and the Python API.  Each case is (id, how, what, pattern): ``pattern`` is a
regular expression that must be found in the message, and it contains the offending value.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import metaopt
from metaopt.cli import main
from metaopt.errors import MetaOptError

SMALL = ["--iterations", "1", "--meta-batch", "1", "--no-progress"]


def _cli_cases() -> list[tuple[str, list[str], str]]:
    cases: list[tuple[str, list[str], str]] = []
    for flag in ("--ways", "--shots", "--query", "--meta-batch", "--image-size", "--eval-tasks"):
        key = flag[2:].replace("-", "_")
        cases += [
            (f"{flag} 0", [flag, "0"], rf"{key}=0 must be"),
            (f"{flag} -1", [flag, "-1"], rf"{key}=-1 must be"),
            (f"{flag} abc", [flag, "abc"], r"invalid int value: 'abc'"),
            (f"{flag} 1.5", [flag, "1.5"], r"invalid int value: '1.5'"),
        ]
    for flag in ("--inner-lr", "--meta-lr"):
        key = flag[2:].replace("-", "_")
        cases += [
            (f"{flag} nan", [flag, "nan"], rf"'{key}' must be a finite number; got nan"),
            (f"{flag} inf", [flag, "inf"], rf"'{key}' must be a finite number; got inf"),
            (f"{flag}=-inf", [f"{flag}=-inf"], rf"'{key}' must be a finite number; got -inf"),
            (f"{flag} 1e400", [flag, "1e400"], rf"'{key}' must be a finite number; got inf"),
            (f"{flag} -1", [flag, "-1"], rf"{key}=-1.0"),
            (f"{flag} 0", [flag, "0"], rf"{key}=0.0"),
            (f"{flag} abc", [flag, "abc"], r"invalid float value: 'abc'"),
        ]
    cases += [
        ("--clip-grad-norm nan", ["--clip-grad-norm", "nan"], r"'clip_grad_norm' must be a finite number; got nan"),
        ("--clip-grad-norm 0", ["--clip-grad-norm", "0"], r"clip_grad_norm=0.0 must be > 0"),
        ("--clip-grad-norm -1", ["--clip-grad-norm", "-1"], r"clip_grad_norm=-1.0 must be > 0"),
        ("--clip-grad-norm inf", ["--clip-grad-norm", "inf"], r"'clip_grad_norm' must be a finite number; got inf"),
        ("--iterations -1", ["--iterations", "-1"], r"iterations=-1"),
        ("--inner-steps -1", ["--inner-steps", "-1"], r"inner_steps=-1"),
        ("--eval-every -1", ["--eval-every", "-1"], r"eval_every=-1 must be >= 0"),
        ("--checkpoint-every -1", ["--checkpoint-every", "-1"], r"checkpoint_every=-1 >= 0"),
        ("--keep-checkpoints 0", ["--keep-checkpoints", "0"], r"keep_checkpoints=0 must be >= 1"),
        ("--workers -1", ["--workers", "-1"], r"workers=-1 must be >= 0"),
        ("--warmup-iters -1", ["--warmup-iters", "-1"], r"warmup_iters=-1 must be >= 0"),
        ("--seed -1", ["--seed", "-1"], r"seed=-1 must be an integer in \[0, 2\*\*63\)"),
        ("--seed 2**70", ["--seed", str(2**70)], rf"seed={2**70} must be an integer"),
        ("--task-chunk 0", ["--task-chunk", "0"], r"task_chunk=0 must be >= 1"),
        ("--eval-inner-steps -1", ["--eval-inner-steps", "-1"], r"eval_inner_steps=-1 must be >= 0"),
        ("--engine vmapp", ["--engine", "vmapp"], r"invalid choice: 'vmapp'"),
        ("--backend jax", ["--backend", "jax"], r"invalid choice: 'jax'"),
        ("--bn-policy foo", ["--bn-policy", "foo"], r"invalid choice: 'foo'"),
        ("--inner-optimizer adamm", ["--inner-optimizer", "adamm"], r"invalid choice: 'adamm'"),
        ("--precision fp8", ["--precision", "fp8"], r"invalid choice: 'fp8'"),
        ("--precision fp16", ["--precision", "fp16"], r"'fp16' is not supported"),
        ("--device tpu", ["--device", "tpu"], r"invalid choice: 'tpu'"),
        ("--on-nonfinite ignore", ["--on-nonfinite", "ignore"], r"invalid choice: 'ignore'"),
        ("--lr-schedule cos", ["--lr-schedule", "cos"], r"invalid choice: 'cos'"),
        ("--keep-best acc", ["--keep-best", "acc"], r"invalid choice: 'acc'"),
        ("--keep-best without eval", ["--keep-best", "accuracy"], r"keep_best='accuracy' needs periodic evaluation"),
        ("--outer-optimizer adamx", ["--outer-optimizer", "adamx"], r"outer_optimizer='adamx' is not known"),
        ("--channels 2", ["--channels", "2"], r"channels=2 must be 1 or 3"),
        ("--channels 4", ["--channels", "4"], r"channels=4 must be 1 or 3"),
        ("--normalize maybe", ["--normalize", "maybe"], r"expected true or false; got 'maybe'"),
        ("--data nosuch", ["--data", "nosuch"], r"nosuch"),
        ("--data folder:missing", ["--data", "folder:/nonexistent/x"], r"/nonexistent/x"),
        ("--data csv:missing", ["--data", "csv:/nonexistent/train.csv"], r"/nonexistent/train.csv"),
        ("--data omniglot:missing", ["--data", "omniglot:/nonexistent/o.zip"], r"/nonexistent/o.zip"),
        ("--model mlp on images", ["--model", "mlp"], r"model='mlp' is the sinusoid regression MLP"),
        ("--model conv4 on sinusoid", ["--model", "conv4", "--data", "sinusoid"], r"model='conv4' takes images"),
        ("--model unknown", ["--model", "nosuchnet_xyz"], r"nosuchnet_xyz"),
        ("--pretrained-path with conv4", ["--pretrained-path", "/missing.pt"], r"model='auto' is not a timm model"),
        (
            "--pretrained-path missing",
            ["--model", "resnet10t", "--pretrained-path", "/missing.pt"],
            r"pretrained_path='/missing.pt' does not exist",
        ),
        ("--plugin unknown", ["--plugin", "nosuchplugin"], r"unknown plugin 'nosuchplugin'"),
        ("--plugin bad option", ["--plugin", "shot:weigth=1"], r"no option 'weigth'"),
        ("--plugin nan option", ["--plugin", "shot:weight=.nan"], r"'weight' must be a finite number; got nan"),
        ("--plugin inf option", ["--plugin", "shot:weight=.inf"], r"'weight' must be a finite number; got inf"),
        ("--plugin bad yaml", ["--plugin", "shot:weight=[1"], r"plugin option 'weight=\[1' in 'shot:weight=\[1'"),
        ("--plugin no value", ["--plugin", "shot:weight"], r"plugin option 'weight' in 'shot:weight' must look like"),
        ("--plugin text number", ["--plugin", "sharp_maml:rho_inner=abc"], r"'rho_inner' must be float; got 'abc'"),
        ("--plugin clash-free name", ["--plugin", "builtin/nosuch"], r"no plugin 'nosuch' from 'builtin'"),
        (
            "--outer-optimizer-kwargs list",
            ["--outer-optimizer-kwargs", "[1]"],
            r"'outer_optimizer_kwargs' must be a mapping.*\[1\]",
        ),
        (
            "--outer-optimizer-kwargs lr",
            ["--outer-optimizer-kwargs", '{"lr": 1}'],
            r"outer_optimizer_kwargs=\{'lr': 1\} sets lr",
        ),
        (
            "--outer-optimizer-kwargs betas",
            ["--outer-optimizer-kwargs", '{"betas": [2, 3]}'],
            r"\{'betas': \[2, 3\]\} do not fit 'adam'",
        ),
        ("--outer-optimizer-kwargs not json", ["--outer-optimizer-kwargs", "notjson"], r"not valid JSON: 'notjson'"),
        (
            "--outer-optimizer-kwargs sgd momentum -1",
            ["--outer-optimizer", "sgd", "--outer-optimizer-kwargs", '{"momentum": -1}'],
            r"\{'momentum': -1\} do not fit 'sgd'",
        ),
        (
            "--outer-optimizer-kwargs unknown",
            ["--outer-optimizer-kwargs", '{"nosuch": 1}'],
            r"\{'nosuch': 1\} do not fit",
        ),
        ("--outer-optimizer-kwargs deep", ["--outer-optimizer-kwargs", "[" * 100000], r"not valid JSON"),
        (
            "--param-group-lr negative",
            ["--param-group-lr", '{"model.": -1}'],
            r"param_group_lr\['model.'\]=-1.0 must be",
        ),
        (
            "--param-group-lr text",
            ["--param-group-lr", '{"model.": "x"}'],
            r"param_group_lr\['model.'\]\" must be float; got 'x'",
        ),
        ("--param-group-lr nan", ["--param-group-lr", '{"model.": NaN}'], r"must be a finite number; got nan"),
        ("--param-group-lr list", ["--param-group-lr", "[1]"], r"'param_group_lr' must be a mapping"),
        (
            "--param-group-lr no match",
            ["--param-group-lr", '{"nosuch.": 0.1}'],
            r"prefixes \['nosuch.'\] match no meta-parameter",
        ),
        (
            "--test-alphabet on glyphs",
            ["--test-alphabet", "Korean"],
            r"test_alphabets=\['Korean'\] applies to omniglot",
        ),
        ("--within-alphabet on glyphs", ["--within-alphabet"], r"within_alphabet applies to omniglot"),
        ("--image-size 3", ["--image-size", "3"], r"image_size=3 is too small for auto"),
        ("--image-size 100000", ["--image-size", "100000"], r"images of 100000x100000 px holds up to"),
        ("--shots 100000", ["--shots", "100000"], r"\(100000 shots \+ 15 query\)"),
        ("--shots 100000 sinusoid", ["--data", "sinusoid", "--shots", "100000"], r"shots \+ query = 100015"),
        ("--log-with nosuch", ["--log-with", "nosuch"], r"unknown tracker 'nosuch'"),
        (
            "--engine vmap with rmsprop",
            ["--engine", "vmap", "--inner-optimizer", "rmsprop"],
            r"inner_optimizer='rmsprop'",
        ),
        ("--data glyphs with text", ["--data", "glyphs:x"], r"glyphs:x"),
        ("--normalize false is false", ["--normalize", "nope"], r"got 'nope'"),
    ]
    return cases


@pytest.mark.parametrize("case", _cli_cases(), ids=lambda c: c[0])
def test_cli_flag(case, tmp_path, capsys):
    _, args, pattern = case
    code = _run(["train", "--out", str(tmp_path / "run"), *SMALL, *args])
    _assert_refused(code, capsys, pattern)


def _run(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse's own refusals: status 2 with the value named
        return int(exc.code or 0)


def _assert_refused(code: int, capsys, pattern: str) -> None:
    err = capsys.readouterr().err
    assert code == 2, f"exit {code}; stderr: {err[-2000:]}"
    assert "Traceback" not in err
    assert re.search(pattern, err), f"{pattern!r} not in: {err[-2000:]}"


# -- config files -----------------------------------------------------------------------------
ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(  # the classic: 81 aliases, 9**9 values
    f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi")
)
MANY_ALIASES = "a: &a 1\nb: [" + ", ".join(["*a"] * 150) + "]\n"
CONFIG_CASES: list[tuple[str, str | bytes, str, str]] = [
    ("plugins as a string", "plugins: shot\n", ".yaml", r"'plugins' must be a list; got 'shot'.*\['shot'\]"),
    ("plugins as a number", "plugins: 5\n", ".yaml", r"'plugins' must be a list; got 5"),
    ("plugins entry without name", "plugins: [{weight: 1}]\n", ".yaml", r"plugin entry \{'weight': 1\}"),
    ("log_with as a string", "log_with: tensorboard\n", ".yaml", r"'log_with' must be a list; got 'tensorboard'"),
    ("log_with entry a number", "log_with: [5]\n", ".yaml", r"'log_with\[0\]' must be str; got 5"),
    ("test_alphabets as a number", "test_alphabets: 5\n", ".yaml", r"'test_alphabets' must be a list; got 5"),
    ("inner_lr .nan", "inner_lr: .nan\n", ".yaml", r"'inner_lr' must be a finite number; got nan"),
    ("meta_lr .inf", "meta_lr: .inf\n", ".yaml", r"'meta_lr' must be a finite number; got inf"),
    ("inner_lr 1e400", "inner_lr: 1e400\n", ".yaml", r"'inner_lr' must be a finite number; got inf"),
    ("inner_lr negative", "inner_lr: -0.5\n", ".yaml", r"inner_lr=-0.5"),
    ("duplicate key", "ways: 5\nshots: 1\nways: 6\n", ".yaml", r"key 'ways' is given twice \(lines 1 and 3\)"),
    ("duplicate JSON key", '{"ways": 5, "ways": 6}', ".json", r"\['ways'\] given twice"),
    ("alias bomb", ALIAS_BOMB, ".yaml", r"expands its YAML aliases to \d+ values"),
    ("many aliases", MANY_ALIASES, ".yaml", r"uses 150 YAML aliases"),
    ("a list", "- a\n- b\n", ".yaml", r"must hold a mapping of settings; got list"),
    ("empty", "", ".yaml", r"must hold a mapping of settings; got NoneType"),
    ("a string", "just a string\n", ".yaml", r"must hold a mapping of settings; got str"),
    ("unknown key", "wayz: 5\n", ".yaml", r"unknown config key 'wayz'.*'ways'"),
    ("ways as a list", "ways: [1]\n", ".yaml", r"'ways' must be int; got \[1\]"),
    ("outer kwargs as a list", "outer_optimizer_kwargs: [1]\n", ".yaml", r"'outer_optimizer_kwargs' must be a mapping"),
    ("param_group_lr text", "param_group_lr: {a.: x}\n", ".yaml", r"param_group_lr\['a.'\]\" must be float; got 'x'"),
    ("param_group_lr int keys", "param_group_lr: {1: 0.1}\n", ".yaml", r"must have string keys; got 1"),
    ("seed 1.5", "seed: 1.5\n", ".yaml", r"'seed' must be int; got 1.5"),
    ("ways null", "ways: null\n", ".yaml", r"'ways' needs a value; got null"),
    ("meta_lr null", "meta_lr: null\n", ".yaml", r"'meta_lr' needs a value; got null"),
    ("engine a number", "engine: 5\n", ".yaml", r"'engine' must be str; got 5"),
    ("model a list", "model: [conv4]\n", ".yaml", r"'model' must be str; got \['conv4'\]"),
    ("invalid YAML", "a: [\n", ".yaml", r"is not valid YAML"),
    ("invalid JSON", "{", ".json", r"is not valid JSON"),
    ("deep JSON", "[" * 100000, ".json", r"nested too deeply"),
    # closed brackets, 3x the recursion limit: the composer recurses (an unclosed run only fails to parse,
    # and PyYAML scans about 1 ms per bracket, so 100,000 took 100 s of the suite)
    ("deep YAML", "[" * 3000 + "]" * 3000, ".yaml", r"nested too deeply"),
    ("UTF-16", "ways: 5\n".encode("utf-16"), ".yaml", r"is not UTF-8 text.*UTF-16"),
    (
        "latin-1",
        "data: caf\xe9\n".encode("latin-1"),
        ".yaml",
        r"is not UTF-8 text: invalid continuation byte at byte 9",
    ),
    ("python tag", "ways: !!python/object/apply:os.system ['true']\n", ".yaml", r"is not valid YAML"),
    ("bool as text", "rotations: perhaps\n", ".yaml", r"'rotations' must be bool; got 'perhaps'"),
    ("iterations text", "iterations: many\n", ".yaml", r"'iterations' must be int; got 'many'"),
]


@pytest.mark.parametrize("case", CONFIG_CASES, ids=lambda c: c[0])
def test_config_file(case, tmp_path, capsys):
    _, content, suffix, pattern = case
    path = tmp_path / f"config{suffix}"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    code = _run(["train", "--config", str(path), "--out", str(tmp_path / "run"), "--no-progress"])
    _assert_refused(code, capsys, pattern)
    assert not (tmp_path / "run" / "config.json").exists()  # nothing started


def test_config_folder_and_missing_file(tmp_path, capsys):
    _assert_refused(_run(["train", "--config", str(tmp_path)]), capsys, rf"'{tmp_path}' is a folder")
    _assert_refused(_run(["train", "--config", str(tmp_path / "x.yaml")]), capsys, r"x.yaml' does not exist")


# -- data sources --------------------------------------------------------------------------------
def test_data_sources(tmp_path, capsys):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    empty = tmp_path / "empty"
    empty.mkdir()
    nested = tmp_path / "nested" / "train" / "c0"
    nested.mkdir(parents=True)
    (tmp_path / "nested" / "train" / "c1").mkdir()
    not_zip = tmp_path / "o.zip"
    not_zip.write_text("not a zip")
    bad_csv = tmp_path / "train.csv"
    bad_csv.write_text("filename,label\nmissing.png,a\n")
    cases = [
        (["--data", f"folder:{a_file}"], rf"{a_file}"),
        (["--data", f"folder:{empty}"], rf"'{empty}' has no class sub-folders"),
        (["--data", f"folder:{tmp_path / 'nested'}"], r"holds no images"),
        (["--data", f"omniglot:{not_zip}"], rf"{not_zip}"),
        (["--data", f"csv:{bad_csv}"], r"missing.png"),
    ]
    for args, pattern in cases:
        code = _run(["train", "--out", str(tmp_path / "run"), *SMALL, *args])
        _assert_refused(code, capsys, pattern)


def test_run_folders(tmp_path, capsys):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    _assert_refused(_run(["train", "--out", str(a_file), *SMALL]), capsys, rf"--out '{a_file}' is a file")
    _assert_refused(
        _run(["train", "--out", str(tmp_path / "none"), "--resume", *SMALL]), capsys, r"none' is not a run directory"
    )
    done = tmp_path / "done"
    assert main(["train", "--data", "sinusoid", "--out", str(done), *SMALL]) == 0
    capsys.readouterr()
    again = ["train", "--data", "sinusoid", "--out", str(done), "--resume", *SMALL]
    _assert_refused(_run(again), capsys, r"already at iteration 1, and iterations=1: nothing to train")
    _assert_refused(_run(["eval", str(tmp_path / "none")]), capsys, r"none' is not a run directory")
    _assert_refused(_run(["eval", str(done), "--tasks", "0"]), capsys, r"tasks")
    _assert_refused(_run(["export", str(a_file)]), capsys, rf"{a_file}")


# -- Lake runs -------------------------------------------------------------------------------------
def _archive(path: Path) -> Path:
    import zipfile

    with zipfile.ZipFile(path, "w") as zf:
        for alphabet in ("Alpha", "Beta"):
            for c in range(3):
                for d in range(1, 3):
                    zf.writestr(f"images_background/{alphabet}/character{c + 1:02d}/0{c + 1:03d}_{d:02d}.png", b"x")
    return path


LAKE_CASES = [
    ("--ways 0", ["--ways", "0"], r"ways=0: a one-shot run needs at least 2 classes"),
    ("--ways 1", ["--ways", "1"], r"ways=1: a one-shot run needs at least 2 classes"),
    ("--runs -3", ["--runs", "-3"], r"runs=-3 must be >= 1"),
    ("--runs 0", ["--runs", "0"], r"runs=0 must be >= 1"),
    ("--ways abc", ["--ways", "abc"], r"invalid int value: 'abc'"),
    ("unknown alphabet", ["--alphabet", "Gamma"], r"alphabet 'Gamma' is not in"),
    ("too few characters", ["--ways", "20"], r"has 20 characters for a 20-way run"),
]


@pytest.mark.parametrize("case", LAKE_CASES, ids=lambda c: c[0])
def test_lake_runs_flags(case, tmp_path, capsys):
    _, args, pattern = case
    archive = _archive(tmp_path / "o.zip")
    base = ["lake-runs", "--omniglot", str(archive), "--out", str(tmp_path / "runs")]
    if "--alphabet" not in args:
        base += ["--alphabet", "Alpha"]
    _assert_refused(_run([*base, "--ways", "2", *args]), capsys, pattern)


def test_lake_runs_files(tmp_path, capsys):
    archive = _archive(tmp_path / "o.zip")
    not_zip = tmp_path / "x.zip"
    not_zip.write_text("not a zip")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    base = ["lake-runs", "--alphabet", "Alpha", "--ways", "2"]
    _assert_refused(
        _run([*base, "--omniglot", str(not_zip), "--out", str(tmp_path / "r")]), capsys, r"x.zip' is not a zip"
    )
    _assert_refused(
        _run([*base, "--omniglot", str(tmp_path / "no.zip"), "--out", str(tmp_path / "r")]),
        capsys,
        r"no.zip' does not exist",
    )
    _assert_refused(
        _run([*base, "--omniglot", str(archive), "--out", str(a_file)]), capsys, rf"--out '{a_file}' is a file"
    )


@pytest.mark.parametrize(
    "labels, pattern",
    [
        (b"", r"class_labels.txt' is empty"),
        (b"   \n\n", r"class_labels.txt' is empty"),
        (b"run01/test/item01.png run01/training/class01.png \xe9\n", r"is not UTF-8 text"),
        (b"run01/test/item01.png\n", r"line 1: expected 'test/itemXX.png training/classYY.png'"),
        (b"run01/test/item01.png run01/training/class09.png\n", r"'class09.png' is not in"),
    ],
    ids=["empty", "blank", "latin-1", "one column", "unknown class"],
)
def test_reading_bad_lake_runs(tmp_path, labels, pattern):
    from PIL import Image

    from metaopt.data.lake import read_lake_runs
    from metaopt.errors import DataError

    run = tmp_path / "runs" / "run01"
    (run / "training").mkdir(parents=True)
    (run / "test").mkdir()
    for name in ("training/class01.png", "training/class02.png", "test/item01.png"):
        Image.new("L", (8, 8)).save(run / name)
    (run / "class_labels.txt").write_bytes(labels)
    with pytest.raises(DataError, match=pattern):
        read_lake_runs(tmp_path / "runs")


# -- the Python API ---------------------------------------------------------------------------------
def _mlp() -> nn.Module:
    return metaopt.models.mlp()


def _learner(**kw):
    return metaopt.MetaLearner(_mlp(), **kw)


def _task(**kw):
    base = {"sx": torch.zeros(4, 1), "sy": torch.zeros(4, 1), "qx": torch.zeros(4, 1), "qy": torch.zeros(4, 1)}
    base.update(kw)
    return tuple(base.values())


API_CASES = [
    ("inner_lr nan", lambda: _learner(inner_lr=float("nan")), r"inner_lr=nan must be a positive finite number"),
    ("inner_lr inf", lambda: _learner(inner_lr=math.inf), r"inner_lr=inf must be a positive finite number"),
    ("inner_lr -1", lambda: _learner(inner_lr=-1.0), r"inner_lr=-1.0"),
    ("inner_lr 0", lambda: _learner(inner_lr=0), r"inner_lr=0 must be"),
    ("inner_lr text", lambda: _learner(inner_lr="0.1"), r"inner_lr='0.1'"),
    ("inner_lr empty list", lambda: _learner(inner_lr=[]), r"inner_lr=\[\]"),
    ("inner_lr list with nan", lambda: _learner(inner_lr=[0.1, float("nan")], inner_steps=2), r"inner_lr=\[0.1, nan\]"),
    (
        "inner_lr list too short",
        lambda: _learner(inner_lr=[0.1, 0.1], inner_steps=3),
        r"inner_lr has 2 per-step values",
    ),
    (
        "evaluate with more steps than per-step rates",
        lambda: _learner(inner_lr=[0.1, 0.1], inner_steps=2).evaluate([_task()], steps=5),
        r"5 inner steps asked for, but inner_lr has only 2 per-step values",
    ),
    (
        "adapt with more steps than per-step rates",
        lambda: _learner(inner_lr=[0.1, 0.1], inner_steps=2, engine="vmap").adapt(_task(), steps=3),
        r"3 inner steps asked for, but inner_lr has only 2 per-step values",
    ),
    ("plugins a string", lambda: metaopt.MetaLearner(_mlp(), "shot"), r"plugins must be a list.*'shot'"),
    ("plugins a number", lambda: metaopt.MetaLearner(_mlp(), 5), r"plugins must be a list.*got int 5"),
    ("plugins unknown name", lambda: _learner(plugins=["nosuch"]), r"unknown plugin 'nosuch'"),
    ("plugins bad spec", lambda: _learner(plugins=["shot:weight=[1"]), r"shot:weight=\[1"),
    ("model not a module", lambda: metaopt.MetaLearner("resnet"), r"model must be a torch.nn.Module; got str"),
    ("model without parameters", lambda: metaopt.MetaLearner(nn.ReLU()), r"\(ReLU\) has no trainable parameters"),
    ("model frozen", lambda: metaopt.MetaLearner(_mlp().requires_grad_(False)), r"has no trainable parameters"),
    ("inner_steps -1", lambda: _learner(inner_steps=-1), r"inner_steps=-1"),
    ("inner_steps text", lambda: _learner(inner_steps="2"), r"inner_steps='2'"),
    ("eval_inner_steps -1", lambda: _learner(eval_inner_steps=-1), r"eval_inner_steps=-1"),
    ("engine unknown", lambda: _learner(engine="vmapp"), r"engine='vmapp'.*'vmap'"),
    ("task_chunk 0", lambda: _learner(task_chunk=0), r"task_chunk=0"),
    ("inner_optimizer unknown", lambda: _learner(inner_optimizer="adamm"), r"adamm"),
    ("bn_policy unknown", lambda: _learner(bn_policy="frozen"), r"frozen"),
    ("backend unknown", lambda: _learner(backend="jax"), r"jax"),
    (
        "create_plugin nan",
        lambda: metaopt.create_plugin("shot", weight=float("nan")),
        r"'weight' must be a finite number; got nan",
    ),
    ("create_plugin not a name", lambda: metaopt.create_plugin(5), r"a plugin name must be a string; got int 5"),
    (
        "create_plugin option twice",
        lambda: metaopt.create_plugin("shot:weight=1", weight=2),
        r"\['weight'\] given both",
    ),
    ("backward empty", lambda: _learner(loss_fn=torch.nn.functional.mse_loss).backward([]), r"the meta-batch is empty"),
    ("backward 3-part task", lambda: _learner().backward([_task()[:3]]), r"task 0 has 3 parts"),
    (
        "backward uint8",
        lambda: _learner().backward([_task(sx=torch.zeros(4, 1, dtype=torch.uint8))]),
        r"support_x is uint8",
    ),
    ("backward length mismatch", lambda: _learner().backward([_task(sy=torch.zeros(3, 1))]), r"support 4 vs 3"),
    (
        "backward broadcast MSE",
        lambda: _learner(loss_fn=torch.nn.functional.mse_loss).backward([_task(sy=torch.zeros(4))]),
        r"shape \(4, 1\) but support targets have shape \(4,\)",
    ),
    ("evaluate steps -1", lambda: _learner().evaluate([_task()], steps=-1), r"steps=-1"),
    (
        "NormalizedSGD lr nan",
        lambda: metaopt.optim.NormalizedSGD([nn.Parameter(torch.zeros(1))], lr=float("nan")),
        r"lr=nan",
    ),
    (
        "NormalizedSGD momentum 1.5",
        lambda: metaopt.optim.NormalizedSGD([nn.Parameter(torch.zeros(1))], momentum=1.5),
        r"momentum=1.5",
    ),
    (
        "split_classes fraction 1.5",
        lambda: metaopt.data.split_classes([(0, 0), (1, 1)], 1.5, labels=[0, 1]),
        r"test_classes=1.5",
    ),
    (
        "split_classes unknown class",
        lambda: metaopt.data.split_classes([(0, 0), (1, 1)], [7], labels=[0, 1]),
        r"\[7\] do not occur",
    ),
    ("EpisodeDataset ways 0", lambda: metaopt.data.EpisodeDataset([(0, 0)] * 4, ways=0, labels=[0] * 4), r"ways=0"),
    (
        "EpisodeDataset too many ways",
        lambda: metaopt.data.EpisodeDataset(
            [(0, c) for c in range(4) for _ in range(3)],
            ways=5,
            shots=1,
            query=1,
            labels=[c for c in range(4) for _ in range(3)],
        ),
        r"ways=5 is larger than the 4 classes",
    ),
    (
        "EpisodeDataset small class",
        lambda: metaopt.data.EpisodeDataset([(0, 0)] * 2, ways=1, shots=1, query=5, labels=[0, 0]),
        r"has 2 items but a task needs shots \+ query = 6",
    ),
    (
        "EpisodeDataset labels length",
        lambda: metaopt.data.EpisodeDataset([(0, 0)] * 4, labels=[0, 1]),
        r"2 labels for a dataset of 4 items",
    ),
    (
        "TrainConfig from_dict unknown",
        lambda: metaopt.config.TrainConfig.from_dict({"wayz": 5}),
        r"unknown config key 'wayz'",
    ),
    (
        "TrainConfig nan",
        lambda: metaopt.config.TrainConfig.from_dict({"meta_lr": float("nan")}),
        r"'meta_lr' must be a finite number; got nan",
    ),
]


@pytest.mark.parametrize("case", API_CASES, ids=lambda c: c[0])
def test_python_api(case):
    _, call, pattern = case
    with pytest.raises(MetaOptError, match=pattern):
        call()


def test_the_suite_has_at_least_150_cases():
    count = len(_cli_cases()) + len(CONFIG_CASES) + len(LAKE_CASES) + len(API_CASES) + 5 + 7 + 3 + 5 + 2
    assert count >= 150, count
    json.dumps(count)
