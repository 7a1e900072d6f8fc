"""Run directories that never lose or mix work: the lock, config vs checkpoint, checksums, torn
logs, foreign files, full and read-only disks, temp files, the random state across a resume."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import OUTSIDE

from metaopt.cli import main
from metaopt.rundir import RunDirWarning, checkpoint_files, load_verified

TRAIN = ["train", "--data", "sinusoid", "--meta-batch", "2", "--shots", "5", "--no-progress"]


def _train(out: Path, iterations: int = 3, *extra: str) -> int:
    return main(
        [*TRAIN, "--iterations", str(iterations), "--checkpoint-every", "1", "--keep-checkpoints", "5"]
        + ["--out", str(out), *extra]
    )


def _all_checkpoints_load(out: Path, skip: tuple[Path, ...] = ()) -> None:
    for path in checkpoint_files(out):
        if path not in skip:
            assert load_verified(path)["iteration"] >= 1


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "metaopt.cli", *args]


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _wait_for(condition, seconds: float = 120.0) -> None:
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


# -- 1. one trainer per run folder -----------------------------------------------------
@pytest.mark.slow
def test_a_second_trainer_on_the_same_folder_is_refused_naming_the_holder(tmp_path):
    """Two trainers on one --out both 'trained 1500 iterations' into one folder."""
    out = tmp_path / "run"
    first = subprocess.Popen(
        _cli(*TRAIN, "--iterations", "1000000", "--out", str(out), "--checkpoint-every", "50"),
        env=ENV,
        cwd=OUTSIDE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for(lambda: (out / "metrics.jsonl").is_file())
        second = subprocess.run(
            _cli(*TRAIN, "--iterations", "400", "--out", str(out), "--inner-lr", "0.02", "--overwrite"),
            env=ENV,
            cwd=OUTSIDE,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert second.returncode == 2
        assert f"in use by process {first.pid} on host" in second.stderr, second.stderr
        _wait_for(lambda: checkpoint_files(out))
        during = subprocess.run(
            _cli("eval", str(out), "--tasks", "4"), env=ENV, cwd=OUTSIDE, capture_output=True, text=True
        )
        assert during.returncode == 0, during.stderr  # eval reads the latest complete checkpoint meanwhile
    finally:
        first.send_signal(signal.SIGTERM)  # a clean stop: checkpoint, exit 128 + 15
        _, stderr = first.communicate(timeout=300)
    assert first.returncode == 128 + signal.SIGTERM, stderr
    steps = [json.loads(line)["iteration"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1))  # one run's log, not two interleaved
    assert json.loads((out / "config.json").read_text())["inner_lr"] == 0.01


def test_a_killed_trainers_lock_is_stale_and_taken_over(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        _cli(*TRAIN, "--iterations", "100000", "--out", str(out), "--checkpoint-every", "5"),
        env=ENV,
        cwd=OUTSIDE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _wait_for(lambda: checkpoint_files(out))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert json.loads((out / ".lock").read_text())["pid"] == proc.pid  # the lock file is left behind
    done = checkpoint_files(out)[-1]
    target = load_verified(done)["iteration"] + 2
    with pytest.warns(RunDirWarning, match=f"took over the stale lock of process {proc.pid}"):
        assert _train(out, target, "--resume") == 0
    assert load_verified(checkpoint_files(out)[-1])["iteration"] == target


# -- 2. a folder with checkpoints is a run --------------------------------------------
def test_checkpoints_without_config_are_a_run_and_resume_rebuilds_the_config(tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(out, 2) == 0
    saved = json.loads((out / "config.json").read_text())
    (out / "config.json").unlink()
    log = (out / "metrics.jsonl").read_text()
    assert _train(out, 2) == 2  # no silent start-over
    assert "already holds a run (a config, checkpoints or a log)" in capsys.readouterr().err
    assert (out / "metrics.jsonl").read_text() == log and len(checkpoint_files(out)) == 2
    with pytest.warns(RunDirWarning, match="config.json' is missing; using the config stored in the newest"):
        assert _train(out, 3, "--resume") == 0
    rebuilt = json.loads((out / "config.json").read_text())
    assert {k: v for k, v in rebuilt.items() if k != "iterations"} == {
        k: v for k, v in saved.items() if k != "iterations"
    }


# -- 3. the checkpoint's config is the truth ---------------------------------------------
def test_an_edited_config_is_refused_by_resume_and_eval_naming_the_keys(tmp_path, capsys):
    """Editing inner_lr and shots made --resume continue silently and eval report 788.9 instead of 2.32."""
    out = tmp_path / "run"
    assert _train(out, 2) == 0
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "inner_lr": 0.5, "shots": 7}))
    capsys.readouterr()
    assert _train(out, 3, "--resume") == 2
    err = capsys.readouterr().err
    assert "inner_lr: 0.01 -> 0.5" in err and "shots: 5 -> 7" in err
    assert main(["eval", str(out), "--tasks", "4"]) == 2
    assert "inner_lr: 0.01 -> 0.5" in capsys.readouterr().err
    _all_checkpoints_load(out)


# -- 4. checksums -----------------------------------------------------------------------
def _flip_in_entry(path: Path, suffix: str, offset_from_end: int = 3) -> None:
    """Flip one bit inside the zip entry whose name ends with ``suffix`` (the file stays a valid zip)."""
    with zipfile.ZipFile(path) as archive:
        info = max((i for i in archive.infolist() if i.filename.endswith(suffix)), key=lambda i: i.file_size)
    raw = bytearray(path.read_bytes())
    header = info.header_offset
    name_len = int.from_bytes(raw[header + 26 : header + 28], "little")
    extra_len = int.from_bytes(raw[header + 28 : header + 30], "little")
    start = header + 30 + name_len + extra_len
    raw[start + info.file_size - offset_from_end] ^= 0x10
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("where", ["weights", "pickle"])
def test_a_flipped_bit_is_caught_by_eval_export_and_resume(tmp_path, capsys, where):
    out = tmp_path / "run"
    assert _train(out, 3) == 0
    newest = checkpoint_files(out)[-1]
    if where == "weights":  # the largest tensor storage
        with zipfile.ZipFile(newest) as archive:
            storages = [i.filename for i in archive.infolist() if "/data/" in i.filename]
        _flip_in_entry(newest, max(storages, key=lambda n: zipfile.ZipFile(newest).getinfo(n).file_size))
    else:
        _flip_in_entry(newest, "data.pkl", offset_from_end=40)
    capsys.readouterr()
    assert main(["eval", str(out), "--tasks", "4"]) == 2
    assert str(newest) in capsys.readouterr().err
    assert main(["export", str(out)]) == 2
    assert str(newest) in capsys.readouterr().err
    with pytest.warns(RunDirWarning, match=f"skipping '{newest}'"):
        assert _train(out, 4, "--resume") == 0  # falls back to the newest intact checkpoint
    assert load_verified(checkpoint_files(out)[-1])["iteration"] == 4
    _all_checkpoints_load(out, skip=(newest,))


# -- 5. torn logs -----------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["half last line", "cut middle line", "trailing blank line"])
def test_a_torn_log_is_repaired_on_resume_naming_what_was_dropped(tmp_path, damage):
    out = tmp_path / "run"
    assert _train(out, 3) == 0
    log = out / "metrics.jsonl"
    lines = log.read_text().splitlines()
    if damage == "half last line":
        log.write_text("\n".join(lines) + "\n" + lines[-1][: len(lines[-1]) // 2])
    elif damage == "cut middle line":
        log.write_text("\n".join([lines[0], lines[1][:10], *lines[2:]]) + "\n")
    else:
        log.write_text("\n".join(lines) + "\n\n\n")
    with pytest.warns(RunDirWarning, match="dropped .* unreadable line"):
        assert _train(out, 4, "--resume") == 0
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert records[-1]["iteration"] == 4
    _all_checkpoints_load(out)


# -- 6. bad config files and foreign checkpoints -----------------------------------------
@pytest.mark.parametrize("content", [b"{not json", b"", b"[1, 2]", "{}".encode("utf-16"), b"[" * 100000])
def test_an_invalid_config_file_is_named_by_resume_and_eval(tmp_path, capsys, content):
    out = tmp_path / "run"
    assert _train(out, 2) == 0
    (out / "config.json").write_bytes(content)
    capsys.readouterr()
    assert _train(out, 3, "--resume") == 2
    assert f"{out / 'config.json'}" in capsys.readouterr().err
    assert main(["eval", str(out), "--tasks", "4"]) == 2
    assert f"{out / 'config.json'}" in capsys.readouterr().err
    _all_checkpoints_load(out)


def test_a_foreign_torch_file_as_newest_checkpoint_is_named(tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(out, 2) == 0
    foreign = out / "checkpoints" / "ckpt-00000099.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    capsys.readouterr()
    assert main(["eval", str(out), "--tasks", "4"]) == 2
    err = capsys.readouterr().err
    assert f"'{foreign}' is not a metaopt checkpoint" in err
    with pytest.warns(RunDirWarning, match="is not a metaopt checkpoint"):
        assert _train(out, 3, "--resume") == 0
    _all_checkpoints_load(out, skip=(foreign,))


def test_a_truncated_newest_checkpoint_is_named_and_resume_falls_back(tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(out, 3) == 0
    newest = checkpoint_files(out)[-1]
    newest.write_bytes(newest.read_bytes()[:500])
    capsys.readouterr()
    assert main(["eval", str(out), "--tasks", "4"]) == 2
    assert f"checkpoint '{newest}' is truncated" in capsys.readouterr().err
    with pytest.warns(RunDirWarning, match=f"skipping '{newest}'"):
        assert _train(out, 4, "--resume") == 0
    _all_checkpoints_load(out, skip=(newest,))


# -- 7. full and read-only disks ---------------------------------------------------------
@contextlib.contextmanager
def _tmpfs(path: Path, size: str):
    path.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root and mount rights): {mounted.stderr.decode()[:200]}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_a_full_disk_says_so_and_keeps_every_checkpoint(tmp_path, capsys):
    with _tmpfs(tmp_path / "small", "1m") as disk:
        out = disk / "run"
        assert _train(out, 2) == 0
        filler = disk / "filler"
        with contextlib.suppress(OSError), open(filler, "wb", buffering=0) as fh:  # fill the disk to the last block
            while True:
                fh.write(b"\0" * 4096)
                fh.flush()
        capsys.readouterr()
        assert _train(out, 6, "--resume") == 2
        err = capsys.readouterr().err
        assert "the disk is full" in err and "bytes free" in err and str(out) in err
        _all_checkpoints_load(out)
        filler.unlink()
        assert _train(out, 4, "--resume") == 0  # space again: the run goes on
        _all_checkpoints_load(out)


def test_a_read_only_run_folder_says_so_on_resume_and_export(tmp_path, capsys):
    with _tmpfs(tmp_path / "ro", "4m") as disk:
        out = disk / "run"
        assert _train(out, 2) == 0
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        capsys.readouterr()
        assert _train(out, 3, "--resume") == 2
        assert "read-only" in capsys.readouterr().err
        assert main(["export", str(out)]) == 2
        err = capsys.readouterr().err
        assert "read-only" in err and "--out FILE" in err
        assert main(["eval", str(out), "--tasks", "4"]) == 0  # reading still works
        assert main(["export", str(out), "--out", str(tmp_path / "model.pt")]) == 0
        _all_checkpoints_load(out)


# -- 8. temp files of killed writes ------------------------------------------------------
def test_temp_files_of_killed_writes_are_swept_when_the_run_is_opened(tmp_path):
    out = tmp_path / "run"
    assert _train(out, 2) == 0
    leftover = out / "checkpoints" / ".ckpt-00000003.pt.k2j4.tmp"
    leftover.write_bytes(b"\0" * 1000)
    with pytest.warns(RunDirWarning, match="removed 1 temp file"):
        assert _train(out, 3, "--resume") == 0
    assert not leftover.exists()


# -- 9. the random state across a resume ----------------------------------------------------
@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_worker_fed_run_ends_with_the_same_random_state(tmp_path, workers):
    """With folder data a resumed run's torch random state differed: the DataLoader drew its base
    seed from torch's global generator each time its iterator was (re)created."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(6):
        (tmp_path / "data" / f"c{c}").mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (12, 12), dtype=np.uint8)).save(
                tmp_path / "data" / f"c{c}" / f"{i}.png"
            )
    args = ["train", "--data", f"folder:{tmp_path / 'data'}", "--ways", "2", "--query", "1", "--image-size", "28"]
    args += ["--meta-batch", "2", "--checkpoint-every", "2", "--keep-checkpoints", "5", "--workers", str(workers)]
    args += ["--no-progress"]
    out = tmp_path / "run"
    assert main([*args, "--iterations", "4", "--out", str(out)]) == 0
    straight = load_verified(checkpoint_files(out)[-1])
    (out / "checkpoints" / "ckpt-00000004.pt").unlink()
    assert main([*args, "--iterations", "4", "--out", str(out), "--resume"]) == 0
    resumed = load_verified(checkpoint_files(out)[-1])
    assert torch.equal(straight["rng"]["torch"], resumed["rng"]["torch"])
    for key, value in straight["learner"].items():
        assert torch.equal(value, resumed["learner"][key]), key


def test_a_cleanly_finished_run_leaves_no_stale_lock(tmp_path, recwarn):
    out = tmp_path / "run"
    assert _train(out, 2) == 0
    assert (out / ".lock").read_text() == ""  # released: no holder named
    assert _train(out, 3, "--resume") == 0
    assert not [w for w in recwarn if "stale lock" in str(w.message)]
