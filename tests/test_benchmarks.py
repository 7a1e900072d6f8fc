"""Smoke runs of the benchmark harnesses with tiny settings (the real runs are in docs/benchmarks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import OUTSIDE

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _run(script: str, *args: str, env: dict[str, str] | None = None) -> None:
    """Run a benchmark runner; the CLI runs it calls run in its own process (``METAOPT_BENCH_IN_PROCESS``,
    one torch import instead of one per call) unless ``env`` sets that variable to "0"."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "METAOPT_BENCH_IN_PROCESS": "1", **(env or {})}
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), *args], capture_output=True, text=True, env=env, cwd=OUTSIDE
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_accuracy_harness_writes_json_and_table(tmp_path):
    args = ["--section", "sinusoid", "--shots", "5", "--sin-iters", "2", "--tasks", "4"]
    _run("accuracy.py", *args, "--algorithms", "maml", "fomaml", "--docs", str(tmp_path), "--work", str(tmp_path / "w"))
    results = json.loads((tmp_path / "accuracy.json").read_text())
    assert set(results) == {"sinusoid/5-shot/maml", "sinusoid/5-shot/fomaml"}
    assert results["sinusoid/5-shot/maml"]["evals"]["10"]["tasks"] == 4
    table = (tmp_path / "accuracy.md").read_text()
    assert "| fomaml | `--plugin fomaml` | 2 |" in table
    summary = table[table.index("## Summary: sinusoid") : table.index("## sinusoid/5-shot")]
    assert "| maml |" in summary and "| fomaml |" in summary and "| reptile |" not in summary


@pytest.mark.slow
def test_speed_harness_times_and_checks_gradients(tmp_path):
    _run(
        "speed.py",
        "--workloads",
        "sinusoid mlp, 10-shot, mb 25, K=1",
        "--contenders",  # "metaopt maml" (the loop engine) is timed in the add-a-contender test below
        "metaopt maml (vmap)",
        "raw higher",
        "hand vmap",
        "--rounds",
        "2",  # two interleaved rounds combine (the default three only cost time here)
        "--iters",
        "2",
        "--warmup",
        "1",
        "--no-memory",
        "--docs",
        str(tmp_path),
    )
    result = json.loads((tmp_path / "speed.json").read_text())["speed"]["sinusoid mlp, 10-shot, mb 25, K=1"]
    assert result["metaopt maml (vmap)"]["median_s"] > 0
    assert all(len(result[c]["round_medians"]) == 2 for c in result)  # each round's median, kept
    # float32 against the float64 reference: rounding only, and never exactly equal
    for contender in ("metaopt maml (vmap)", "raw higher", "hand vmap"):
        assert 0 < result[contender]["rel_err_vs_float64"] < 1e-4
    assert result["metaopt maml (vmap)"]["engine"] == "vmap"
    assert "## Engines against the fastest hand-written loop" in (tmp_path / "speed.md").read_text()
    assert "| raw higher |" in (tmp_path / "speed.md").read_text()
    # the checks alone can be redone on an existing result file (here for one contender); the timings stay
    _run("speed.py", "--check-only", "--workloads", "sinusoid mlp, 10-shot, mb 25, K=1", "--contenders", "raw higher",
         "--docs", str(tmp_path))  # fmt: skip
    again = json.loads((tmp_path / "speed.json").read_text())
    assert again["speed"]["sinusoid mlp, 10-shot, mb 25, K=1"]["raw higher"]["times"] == result["raw higher"]["times"]
    assert "sinusoid mlp, 10-shot, mb 25, K=1" in again["check_runs"]
    assert "Float64 checks redone" in (tmp_path / "speed.md").read_text()


@pytest.mark.slow
def test_recipe_knobs_harness_stops_each_arm_and_scores_it(tmp_path, omniglot_dir):
    from metaopt.cli import main

    lake = tmp_path / "lake"
    assert main(["lake-runs", "--omniglot", str(omniglot_dir / "images_background_small2.zip"), "--alphabet",
                 "Sanskrit", "--out", str(lake), "--runs", "2", "--ways", "5"]) == 0  # fmt: skip
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"data: omniglot:{omniglot_dir / 'images_background_small1.zip'}\nwithin_alphabet: true\nways: 5\n"
        "shots: 1\nquery: 1\nmeta_batch: 1\ninner_steps: 1\neval_inner_steps: 1\niterations: 3000\n"
        "checkpoint_every: 2\nkeep_checkpoints: 3000\neval_tasks: 2\nplugins: [proto_head]\n"
    )
    _run("recipe_knobs.py", str(recipe), "--stop-at", "2", "--lake-runs", str(lake), "--steps", "0", "1",
         "--arm", "no augmentation=--no-augment", "--out-root", str(tmp_path / "arms"), "--docs", str(tmp_path))  # fmt: skip
    results = json.loads((tmp_path / "recipe_knobs.json").read_text())["recipe"]
    row = results["arms"]["no augmentation"]
    assert row["change"] == "--no-augment" and results["stop_at"] == 2
    assert set(row["errors"]["lake (2 runs, 10 items)"]) == {"0", "1"}
    assert not (tmp_path / "arms" / "no_augmentation" / "checkpoints" / "ckpt-00003000.pt").exists()  # stopped
    assert "| no augmentation | `--no-augment` |" in (tmp_path / "recipe_knobs.md").read_text()


def test_recipe_knobs_report_pairs_seeded_arms_with_the_recipe(tmp_path):
    def arm(error: float) -> dict:
        return {"train_s": 60.0, "change": "x", "errors": {"lake (1 runs, 100 items)": {"0": error}}}

    values = {"recipe": (0.20, 0.18, 0.22), "shot": (0.19, 0.16, 0.20), "sharp": (0.20, 0.19, 0.21)}
    arms = {f"{group} seed {s}": arm(v) for group, vs in values.items() for s, v in enumerate(vs)}
    arms["running BN"] = arm(0.6)  # not seeded: only in the per-arm table
    block = {"recipe": "r.yaml", "stop_at": 400, "device": "cpu", "scored": "now", "arms": arms}
    (tmp_path / "recipe_knobs.json").write_text(json.dumps({"section": block}))
    _run("recipe_knobs.py", "r.yaml", "--stop-at", "400", "--lake-runs", "x", "--report-only", "--name", "section",
         "--docs", str(tmp_path))  # fmt: skip
    table = (tmp_path / "recipe_knobs.md").read_text()
    # recipe 20/18/22: mean 20, sd 2; shot 19/16/20 minus recipe: -1, -2, -2 -> -1.67, se 0.577/sqrt(3)
    assert "| recipe | 0, 1, 2 | 20.00% ± 2.00 |" in table
    assert "| shot | 0, 1, 2 | 18.33% ± 2.08; vs recipe -1.67 ± 0.33 **resolved** |" in table
    # sharp minus recipe: 0, +1, -1 -> 0 ± 0.58, not resolved
    assert "| sharp | 0, 1, 2 | 20.00% ± 1.00; vs recipe +0.00 ± 0.58 |" in table
    assert "| running BN |" in table and "| running BN | 0" not in table


def test_lake_seeds_harness_scores_each_seed_and_their_ensemble(tmp_path, omniglot_dir):
    from metaopt.cli import main
    from metaopt.data.lake import lake_ensemble_errors, read_lake_runs
    from metaopt.trainer import load_run

    lake = tmp_path / "lake"
    assert main(["lake-runs", "--omniglot", str(omniglot_dir / "images_background_small2.zip"), "--alphabet",
                 "Sanskrit", "--out", str(lake), "--runs", "2", "--ways", "5"]) == 0  # fmt: skip
    runs = [tmp_path / f"seed{s}" for s in (0, 1)]
    for seed, run in enumerate(runs):
        train = ["train", "--data", f"omniglot:{omniglot_dir / 'images_background_small1.zip'}", "--ways", "5"]
        train += ["--iterations", "2", "--meta-batch", "1", "--query", "1", "--seed", str(seed), "--no-progress"]
        assert main([*train, "--out", str(run)]) == 0
    _run("lake_seeds.py", "--runs", *map(str, runs), "--lake-runs", str(lake), "--steps", "0", "1",
         "--name", "tiny", "--docs", str(tmp_path))  # fmt: skip
    row = json.loads((tmp_path / "lake_seeds.json").read_text())["tiny"]
    assert row["seeds"] == [0, 1] and row["iterations"] == [2, 2]
    learners = [load_run(run)[1] for run in runs]
    wrong, total, _ = lake_ensemble_errors(learners, read_lake_runs(lake), 1)
    cell = row["scores"][str(lake)]["1"]
    assert cell["items"] == total == 10 and cell["ensemble"] == wrong / total and len(cell["seeds"]) == 2
    assert "| ensemble of the seeds |" in (tmp_path / "lake_seeds.md").read_text()


@pytest.mark.slow
def test_overheads_harness_runs_both_measurements(monkeypatch):
    import metaopt.engines.compile as compile_engine

    monkeypatch.setattr(compile_engine, "COMPILE_BACKEND", "aot_eager")
    monkeypatch.setenv("METAOPT_COMPILE_BACKEND", "aot_eager")  # the hand contenders read it
    sys.path.insert(0, str(BENCH))
    try:
        import overheads
    finally:
        sys.path.remove(str(BENCH))
    assert "ratio" in overheads.safe_norms(iters=1, rounds=1)
    rows = overheads.vmap_overhead(steps=(1,), iters=2, rounds=2)
    assert len(rows) == 3 and all("x hand (paired ratio" in row for row in rows[:2]) and "hand vmap: median" in rows[2]
    rows = overheads.compile_sections(iters=2)
    assert "the compiled call" in "\n".join(rows) and "guard evaluation skipped" in rows[-1]
    rows = overheads.cpp_wrapper_ab(iters=2, rounds=2)
    assert len(rows) == 4 and "cpp_wrapper=True: min" in rows[-1]
    (row,) = overheads.checksum_cost(("test_resnet",))
    assert row.startswith("test_resnet:") and "checksum" in row


def test_the_capped_memory_run_needs_the_table_first_and_a_task_to_score(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(BENCH / "memory.py"), "--capped", "--docs", str(tmp_path)], capture_output=True, text=True
    )
    assert proc.returncode == 2 and "run the table first" in proc.stderr and not (tmp_path / "memory.md").exists()
    proc = subprocess.run(
        [sys.executable, str(BENCH / "memory.py"), "--capped", "--cap-eval-tasks", "0", "--docs", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "--cap-eval-tasks 0: give at least 1" in proc.stderr


@pytest.mark.slow
def test_memory_harness_writes_its_table_and_the_capped_run(tmp_path):
    _run(
        "memory.py",
        *("--steps", "2", "--iters", "1", "--meta-batch", "1", "--image-size", "16"),
        *("--contenders", "recompute (loop)", "--docs", str(tmp_path)),
    )
    results = json.loads((tmp_path / "memory.json").read_text())["cells"]
    assert set(results) == {"recompute (loop)/K=2"}
    assert results["recompute (loop)/K=2"]["growth_mib"] > 0 and results["recompute (loop)/K=2"]["median_s"] > 0
    # --update redoes some cells and keeps the others; the page names both commands
    _run(
        "memory.py",
        *("--steps", "2", "--iters", "1", "--meta-batch", "1", "--image-size", "16"),
        *("--contenders", "recompute (vmap)", "--docs", str(tmp_path), "--update"),
    )
    data = json.loads((tmp_path / "memory.json").read_text())
    assert set(data["cells"]) == {"recompute (loop)/K=2", "recompute (vmap)/K=2"}
    assert data["cells"]["recompute (loop)/K=2"] == results["recompute (loop)/K=2"]
    assert "--update" in (tmp_path / "memory.md").read_text()
    _run(
        "memory.py",
        "--capped",
        "--steps",
        "2",
        "--cap-iters",
        "1",
        "--meta-batch",
        "1",
        "--image-size",
        "16",
        "--cap-extra-mib",
        "4000",
        "--cap-eval-tasks",
        "6",  # scored in batches of 4 and 2 (the default 100 only costs time here)
        "--docs",
        str(tmp_path),
    )
    text = (tmp_path / "memory.md").read_text()
    assert "| recompute (loop) |" in text and "## Under a memory cap" in text and "| recompute | yes | 1 |" in text
    assert "test accuracy (6 tasks, 10 steps)" in text and "--cap-eval-tasks 6`" in text
    assert json.loads((tmp_path / "memory.json").read_text())["capped"]["rows"]["recompute"]["finished"]


# -- the suite: registries, no import circle, a tiny run of every runner, regeneration -----------------
RUNNERS = sorted(p.stem for p in BENCH.glob("*.py") if "def main(" in p.read_text())
SHARED_MODULES = {"common", "registry", "contenders", "workloads", "algorithms"}


def test_no_import_circle_under_benchmarks():
    import ast

    modules = {p.stem for p in BENCH.glob("*.py")}
    edges = {}
    for name in modules:
        tree = ast.parse((BENCH / f"{name}.py").read_text())
        found = set()
        for node in ast.walk(tree):  # imports inside functions count too
            if isinstance(node, ast.ImportFrom) and node.module in modules:
                found.add(node.module)
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name in modules}
        edges[name] = found
    # the shared modules import no runner
    assert all(edges[m] <= SHARED_MODULES for m in SHARED_MODULES), {m: edges[m] for m in SHARED_MODULES}
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in edges[node]:
            assert state.get(nxt) != "open", f"import circle: {' -> '.join([*path, node, nxt])}"
            if nxt not in state:
                visit(nxt, [*path, node])
        state[node] = "done"

    for name in sorted(modules):
        if name not in state:
            visit(name, [])


def test_every_runner_has_a_tiny_run_in_this_file():
    text = Path(__file__).read_text()
    missing = [r for r in RUNNERS if f'"{r}.py"' not in text and f"import {r}\n" not in text]
    assert RUNNERS and not missing, missing


def test_registries_name_unknown_entries_with_the_known_ones():
    import pytest

    sys.path.insert(0, str(BENCH))
    try:
        from algorithms import ALGORITHMS
        from contenders import CONTENDERS
        from workloads import WORKLOADS
    finally:
        sys.path.remove(str(BENCH))
    assert "raw higher" in CONTENDERS and CONTENDERS.get("raw higher").hand
    assert not CONTENDERS.get("metaopt shot").maml and CONTENDERS.get("metaopt maml (vmap)").maml
    with pytest.raises(KeyError, match="did you mean 'raw higher'"):
        CONTENDERS.get("raw highr")
    with pytest.raises(ValueError, match="already registered"):
        WORKLOADS.register("conv4 28px 5w1s, mb 8, K=1", WORKLOADS.get("conv4 28px 5w1s, mb 8, K=1"))
    assert ALGORITHMS.names()[0] == "maml"


def _example(heading: str) -> str:
    """The first python block after ``heading`` in docs/benchmarks/README.md."""
    text = (BENCH.parent / "docs" / "benchmarks" / "README.md").read_text()
    rest = text[text.index(heading) :]
    start = rest.index("```python\n") + len("```python\n")
    return rest[start : rest.index("```", start)]


@pytest.mark.slow
def test_the_documented_way_to_add_a_contender_and_a_workload_runs(tmp_path):
    """docs/benchmarks/README.md's example, as written, registers a workload and two contenders that the
    speed runner times and checks against the float64 reference."""
    entries = tmp_path / "my_entries.py"
    entries.write_text(_example("## Adding a contender or a workload"))
    workload = "sinusoid mlp, 10-shot, mb 5, K=2"
    contenders = ["plain autograd loop", "metaopt maml (recompute, vmap)", "metaopt maml"]
    _run("speed.py", "--register", str(entries), "--workloads", workload, "--contenders", *contenders,
         "--rounds", "1", "--iters", "1", "--warmup", "1", "--no-memory", "--docs", str(tmp_path))  # fmt: skip
    rows = json.loads((tmp_path / "speed.json").read_text())["speed"][workload]
    for contender in contenders:
        assert rows[contender]["median_s"] > 0
        assert 0 <= rows[contender]["rel_err_vs_float64"] < 1e-4, (contender, rows[contender])
    assert rows["metaopt maml (recompute, vmap)"]["engine"] == "vmap" and rows["metaopt maml"]["engine"] == "loop"
    assert "| plain autograd loop |" in (tmp_path / "speed.md").read_text()


def _timings_masked(text: str) -> str:
    """The page with timestamps, dates, wall/seconds values and timing columns of tables blanked."""
    import re

    text = re.sub(r"\d{4}-\d{2}-\d{2}([ T]\d{2}:\d{2}(:\d{2})?)?", "<date>", text)
    text = re.sub(r"\d+(\.\d+)? ?(s|min)\b", "<time>", text)
    out, timing_columns = [], set()
    for line in text.splitlines():
        if line.startswith("|"):
            cells = line.strip("|").split("|")
            if all(set(c.strip()) <= set("-: ") for c in cells):
                pass
            elif any(("wall" in c or " s" in c or "time" in c) for c in cells) and not timing_columns:
                timing_columns = {
                    i for i, c in enumerate(cells) if "wall" in c or c.strip().endswith(" s") or "time" in c
                }
            else:
                cells = ["<timing>" if i in timing_columns else c for i, c in enumerate(cells)]
            line = "|".join(["", *cells, ""])
        else:
            timing_columns = set()
        out.append(line)
    return "\n".join(out)


def _twice(tmp_path, script: str, page: str, *args: str, fresh_second: bool = False) -> None:
    """Run ``script`` twice with the same arguments; its page must change only in timings and timestamps.
    ``fresh_second``: the second run calls the CLI in a fresh interpreter each time (the measured runs'
    path), so the two pages also show that running the CLI in process changes no result."""
    _run(script, *args)
    first = (tmp_path / page).read_text()
    (tmp_path / page).unlink()
    _run(script, *args, env={"METAOPT_BENCH_IN_PROCESS": "0"} if fresh_second else None)
    second = (tmp_path / page).read_text()
    assert _timings_masked(first) == _timings_masked(second)


@pytest.mark.slow
def test_seeds_runner_tiny_regenerates_its_page_and_plot(tmp_path):
    common = ["--setting", "sinusoid", "--iterations", "2", "--tasks", "20", "--work", str(tmp_path / "w")]
    common += ["--docs", str(tmp_path)]
    _run("seeds.py", *common, "--algorithms", "maml", "fomaml", "--seeds", "0", "1")
    first = (tmp_path / "seeds.md").read_text()
    # one cell trained again from scratch (--rerun) must land on the same numbers; the others stay
    _run("seeds.py", *common, "--algorithms", "fomaml", "--seeds", "1", "--rerun")
    page = (tmp_path / "seeds.md").read_text()
    assert _timings_masked(first) == _timings_masked(page)
    assert "| fomaml | 0,1 |" in page and "| maml | 0,1 |" in page
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (tmp_path / "seeds-sinusoid.png").stat().st_size > 0 and "![seeds-sinusoid.png]" in page


@pytest.mark.slow
def test_seeds_runner_writes_the_sinusoid_paper_setting_on_its_own_page(tmp_path):
    """sinusoid-paper: the recipe's flags on the compile engine, scored on 5-shot tasks after 1/5/10 steps."""
    env_backend = {"METAOPT_COMPILE_BACKEND": "aot_eager"}  # no C++ build in the unit suite
    args = ["--setting", "sinusoid-paper", "--algorithms", "maml", "--seeds", "0", "--iterations", "2"]
    _run("seeds.py", *args, "--tasks", "5", "--work", str(tmp_path / "w"), "--docs", str(tmp_path), env=env_backend)
    assert not (tmp_path / "seeds.json").exists()
    row = json.loads((tmp_path / "sinusoid_paper.json").read_text())["sinusoid-paper"]["maml"]["0"]
    assert "--config" in row["train_args"] and row["train_args"][-2:] == ["--engine", "compile"]
    assert list(row["evals"]) == ["1", "5", "10"] and all(e["tasks"] == 5 for e in row["evals"].values())
    config = json.loads((tmp_path / "w" / "sinusoid-paper_maml_0" / "config.json").read_text())
    assert (config["iterations"], config["meta_batch"], config["shots"], config["inner_lr"]) == (2, 25, 10, 0.01)
    page = (tmp_path / "sinusoid_paper.md").read_text()
    assert "0.67 / 0.38 / 0.35" in page and "| maml | 0 |" in page and "`--engine compile`" in page


@pytest.mark.slow
def test_foundation_runner_tiny(tmp_path):
    args = ["--sin-iters", "2", "--omniglot", str(tmp_path / "absent"), "--out", str(tmp_path / "runs")]
    _twice(tmp_path, "foundation.py", "foundation.md", *args, "--docs", str(tmp_path), fresh_second=True)
    assert "| sinusoid 10-shot |" in (tmp_path / "foundation.md").read_text()


@pytest.mark.slow
def test_data_runner_tiny(tmp_path):
    configs = ["in-memory (EpisodeSampler, float32)", "lazy, 0 workers", "lazy, 2 workers"]  # each one a process
    _run("data.py", "--classes", "5", "--per-class", "16", "--tasks", "10", "--configs", *configs,
         "--docs", str(tmp_path))  # fmt: skip
    rows = json.loads((tmp_path / "data.json").read_text())["rows"]
    assert list(rows) == configs and all(row["tasks_per_s"] > 0 and row["peak_rss_mib"] > 0 for row in rows.values())
    assert "| lazy, 2 workers |" in (tmp_path / "data.md").read_text()


@pytest.mark.slow
def test_convergent_fo_audit_runner_tiny(tmp_path):
    _twice(
        tmp_path,
        "convergent_fo_audit.py",
        "convergent_fo.md",
        "--tasks",
        "2",
        "--repeats",
        "0",
        "--docs",
        str(tmp_path),
    )


@pytest.mark.slow
def test_lake_curve_runner_tiny(tmp_path, omniglot_dir):
    from metaopt.cli import main

    lake = tmp_path / "lake"
    assert main(["lake-runs", "--omniglot", str(omniglot_dir / "images_background_small2.zip"), "--alphabet",
                 "Sanskrit", "--out", str(lake), "--runs", "2", "--ways", "5"]) == 0  # fmt: skip
    run = tmp_path / "run"
    train = ["train", "--data", f"omniglot:{omniglot_dir / 'images_background_small1.zip'}", "--ways", "5"]
    train += ["--iterations", "2", "--meta-batch", "1", "--query", "1", "--checkpoint-every", "1", "--no-progress"]
    assert main([*train, "--out", str(run)]) == 0
    _twice(tmp_path, "lake_curve.py", "lake_curve.md", str(run), "--lake-runs", str(lake), "--steps", "1",
           "--name", "tiny", "--docs", str(tmp_path))  # fmt: skip
    points = json.loads((tmp_path / "lake_curve.json").read_text())["tiny"]["points"]
    assert [p["iteration"] for p in points] == [1, 2]


@pytest.mark.slow
def test_compile_runner_tiny(tmp_path):
    _run("compile.py", "--workloads", "sinusoid mlp, 10-shot, mb 25, K=1", "--engines", "vmap", "compile",
         "--iters", "1", "--backend", "aot_eager", "--docs", str(tmp_path))  # fmt: skip
    cells = json.loads((tmp_path / "compile.json").read_text())["cells"]["sinusoid mlp, 10-shot, mb 25, K=1"]
    assert cells["compile"]["gate"]["passed"] and cells["compile"]["recompiles"] == 0
    assert 0 < cells["vmap"]["d_float32"] < 1e-5 and "| compile |" in (tmp_path / "compile.md").read_text()
    assert json.loads((tmp_path / "compile.json").read_text())["malloc"] == "keep"
    assert "freed memory kept in every process" in (tmp_path / "compile.md").read_text()


@pytest.mark.slow
def test_the_device_check_runs_in_its_tiny_mode(tmp_path):
    """benchmarks/device_check.sh, the script a lent GPU runs once, on CPU: every step, tiny."""
    assert "fd_check.py" in (BENCH / "device_check.sh").read_text()  # its runners: "fd_check.py", "speed.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DEVICE_CHECK_TINY": "1", "METAOPT_COMPILE_BACKEND": "aot_eager"}
    proc = subprocess.run(
        ["bash", str(BENCH / "device_check.sh"), str(tmp_path)], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    fd = json.loads((tmp_path / "fd_check.json").read_text())["results"]
    assert all(r["passed"] for row in fd.values() for r in row.values()) and len(fd) == 2
    rows = json.loads((tmp_path / "speed.json").read_text())["speed"]["sinusoid mlp, 10-shot, mb 25, K=1"]
    compiled = ("metaopt maml (compile)", "metaopt maml (compile, CUDA graphs)", "hand vmap (compiled)")
    for contender in (*compiled, "hand vmap (compiled meta-gradient)"):
        assert rows[contender]["median_s"] > 0 and rows[contender]["rel_err_vs_float64"] < 1e-4, contender


def _render(name: str, results: dict, docs: Path) -> None:
    sys.path.insert(0, str(BENCH))
    try:
        module = __import__(name)
        if name == "accuracy":
            module.OUTPUT["docs"] = docs
            module.write_report(results)
        else:
            module.write_report(results, docs)
    finally:
        sys.path.remove(str(BENCH))


def test_every_page_written_from_a_json_regenerates_byte_identical_from_it(tmp_path):
    """The committed pages are what their report code makes of their committed JSON (plots need matplotlib)."""
    import shutil

    import pytest

    pytest.importorskip("matplotlib", reason="the pages embed plots only when matplotlib is installed")
    docs = BENCH.parent / "docs" / "benchmarks"
    for name in ("seeds.json", "recipe_knobs.json"):  # accuracy.md includes their over-seed tables
        shutil.copy(docs / name, tmp_path / name)
    pages = [(m, m) for m in ("seeds", "lake_seeds", "lake_curve", "recipe_knobs", "speed", "accuracy", "memory")]
    pages += [("memory", "memory_resnet10t"), ("compile", "compile"), ("seeds", "sinusoid_paper")]
    pages += [("speed", "compile_speed/speed"), ("curvature", "curvature")]
    for module, page in pages:
        out = tmp_path / Path(page).parent
        out.mkdir(exist_ok=True)
        _render(module, json.loads((docs / f"{page}.json").read_text()), out)
        assert (tmp_path / f"{page}.md").read_text() == (docs / f"{page}.md").read_text(), page


def test_paired_differences_leave_out_blown_up_pairs_and_paper_init_names_its_model():
    sys.path.insert(0, str(BENCH))
    try:
        import seeds
    finally:
        sys.path.remove(str(BENCH))
    nan = float("nan")
    pairs = [(0.40, 0.53), (0.39, 25.3), (0.44, 0.33), (nan, 0.57), (5.9e16, 2.5e6)]
    assert seeds.kept_pairs(pairs, "mse") == [(0.40, 0.53), (0.44, 0.33)]
    assert seeds.kept_pairs([(0.05, 0.9), (0.5, 0.6)], "accuracy") == [(0.05, 0.9), (0.5, 0.6)]
    # "NAME (paper init)": the same algorithm on the MLP initialised as the MAML authors' code
    assert seeds.algorithm_args("sharp_outer (paper init)", 100)[-2:] == ["--model", "mlp_paper"]
    assert seeds.algorithm_args("sharp_outer (paper init)", 100)[:-2] == seeds.algorithm_args("sharp_outer", 100)


def test_curvature_runner_tiny_and_its_eigenvalue_against_the_full_hessian(tmp_path):
    import torch

    from metaopt.cli import main

    run = tmp_path / "run"
    assert main(["train", "--data", "sinusoid", "--iterations", "2", "--meta-batch", "2", "--out", str(run),
                 "--no-progress", "--eval-every", "0"]) == 0  # fmt: skip
    _run("curvature.py", str(run), "--tasks", "2", "--steps", "2", "--power-iters", "3", "--docs", str(tmp_path))
    row = json.loads((tmp_path / "curvature.json").read_text())["run, 5-shot"]
    assert len(row["alpha_lambda_start"]) == 2 and len(row["query_mse"]) == 2 and row["steps"] == 2
    assert "| run, 5-shot |" in (tmp_path / "curvature.md").read_text()
    # the power iteration finds the Hessian eigenvalue of largest magnitude (a small quadratic-plus-tanh loss)
    sys.path.insert(0, str(BENCH))
    try:
        import curvature
    finally:
        sys.path.remove(str(BENCH))
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 6, generator=g, dtype=torch.float64)
    x0 = torch.randn(6, generator=g, dtype=torch.float64)

    def loss(p):
        return 0.5 * p["w"] @ (a @ a.T) @ p["w"] + torch.tanh(p["w"]).sum()

    eigenvalues = torch.linalg.eigvalsh(torch.autograd.functional.hessian(lambda w: loss({"w": w}), x0))
    expected = float(eigenvalues[eigenvalues.abs().argmax()])
    got = curvature.top_eigenvalue(loss, {"w": x0}, iters=200, generator=torch.Generator().manual_seed(1))
    assert abs(got - expected) < 1e-6 * abs(expected), (got, expected)


def test_sensitivity_runner_finds_a_smooth_workload_smooth():
    sys.path.insert(0, str(BENCH))
    try:
        import sensitivity
    finally:
        sys.path.remove(str(BENCH))
    rows = sensitivity.sensitivity("sinusoid mlp, 10-shot, mb 25, K=1")
    distances = [float(row.rsplit(": ", 1)[1]) for row in rows]
    assert len(rows) == 3 and "float32" in rows[0] and "1e-07" in rows[1]
    # the MLP's meta-gradient is smooth: it moves by about the perturbation, not by O(1)
    assert 0 < distances[0] < 1e-5 and 0 < distances[1] < 1e-5 and distances[1] < distances[2] < 1e-4


def test_sensitivity_runner_compares_the_float32_engines_batch_by_batch():
    sys.path.insert(0, str(BENCH))
    try:
        import sensitivity
    finally:
        sys.path.remove(str(BENCH))
    import metaopt.engines.compile as compile_engine

    gate, backend = compile_engine.exactness_gate, compile_engine.COMPILE_BACKEND
    try:
        rows = sensitivity.engines_across_batches("sinusoid mlp, 10-shot, mb 25, K=1", batches=2, backend="aot_eager")
    finally:
        compile_engine.exactness_gate, compile_engine.COMPILE_BACKEND = gate, backend
    assert len(rows) == 4 and "batch 1:" in rows[1] and "seed 2" in rows[3]
    for row in rows:  # a smooth workload: both float32 engines within float32 rounding of float64, not equal to it
        vmap, compiled = (float(part.rsplit(" ", 1)[1]) for part in row.split(": ", 2)[2].split(", "))
        assert 0 < vmap < 1e-5 and 0 < compiled < 1e-5, row


def test_a_speed_run_stopped_mid_workload_keeps_its_rows_and_says_which_are_missing(tmp_path):
    """The device check runs under a time limit: speed.json is written after every contender, and the page of
    a stopped run names the contenders it did not reach instead of ranking the finished ones as if complete."""
    results = json.loads((BENCH.parent / "docs" / "benchmarks" / "compile_speed" / "speed.json").read_text())
    last = list(results["speed"])[-1]
    asked = list(results["speed"][last])
    results["speed"][last] = {c: results["speed"][last][c] for c in asked[:2]}
    results["workload_runs"][last]["contenders"] = asked
    (tmp_path / "speed.json").write_text(json.dumps(results))
    _run("speed.py", "--report-only", "--docs", str(tmp_path))
    page = (tmp_path / "speed.md").read_text()
    section = page[page.index(f"### {last}") :]
    assert f"**Unfinished**: the run stopped before {', '.join(asked[2:])}" in section
    assert f"| {asked[0]} |" in section and f"| {asked[2]} |" not in section
    assert "Unfinished" not in page[: page.index(f"### {last}")]  # finished workloads say nothing
