"""A run directory's files, kept safe: one trainer at a time, a config that cannot drift from
the checkpoints, checksummed checkpoints, a log that survives a torn line, errors that say
"disk full" and "read-only" with the file and the free space.

Layout: ``config.json``, ``metrics.jsonl``, ``checkpoints/ckpt-NNNNNNNN.pt``, ``best.pt``,
``.lock``.  Guarantees and their tests: docs/reliability.md.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import socket
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from metaopt.checkpoint import load_safe
from metaopt.errors import CheckpointError, ConfigError

CONFIG_FILE = "config.json"
DATA_FILE = "data.json"  # what file-based data held when the run was trained (metaopt.data.record)
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"
BEST_FILE = "best.pt"
LOCK_FILE = ".lock"
#: what every metaopt checkpoint holds (a file without them is not one)
CHECKPOINT_KEYS = ("iteration", "learner", "config")
CHECKSUM_KEY = "checksum"


class RunInUseError(ConfigError):
    """Another process is training in this run directory."""


class RunDirWarning(UserWarning):
    """Something in a run directory was repaired or skipped (a stale lock, a torn log line, a corrupt checkpoint)."""


def checkpoint_files(run_dir: Path) -> list[Path]:
    """The run's checkpoints, oldest first (names carry the zero-padded iteration)."""
    return sorted((run_dir / CHECKPOINT_DIR).glob("ckpt-*.pt"))


def is_run(run_dir: Path) -> bool:
    """A folder that holds a config, a checkpoint or a log is a run (never started over silently)."""
    return any((run_dir / name).exists() for name in (CONFIG_FILE, METRICS_FILE, BEST_FILE)) or bool(
        checkpoint_files(run_dir)
    )


# -- the lock ------------------------------------------------------------------------
class RunLock:
    """An exclusive POSIX record lock (``lockf``) on ``RUN/.lock``, which holds the holder's process ID
    and host.

    The kernel drops the lock when its process dies, however it dies: a lock file left by a
    killed trainer is stale and the next run takes it over.  Unlike ``flock``, the lock is not
    inherited by forked DataLoader workers, so it ends with the trainer.  Re-entrant within one
    process (the file is opened once per process: closing a second descriptor would drop it).
    """

    _held: dict[str, list[Any]] = {}  # resolved path -> [file object, count]

    def __init__(self, run_dir: Path) -> None:
        self.path = (run_dir / LOCK_FILE).resolve()
        self.acquired = False

    def acquire(self) -> None:
        key = str(self.path)
        if key in RunLock._held:
            RunLock._held[key][1] += 1
            self.acquired = True
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            handle = open(self.path, "a+b", buffering=0)  # noqa: SIM115 - held open for the whole run
        except OSError as exc:
            raise disk_error(exc, self.path, "lock the run folder") from exc
        try:
            fcntl.lockf(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            handle.seek(0)
            holder = _holder(handle.read().decode("utf-8", errors="replace"))
            handle.close()
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise ConfigError(f"cannot lock the run folder ({self.path}): {exc}.") from exc
            raise RunInUseError(
                f"run folder {str(self.path.parent)!r} is in use by process {holder.get('pid', '?')} on host "
                f"{holder.get('host', '?')} (training since {holder.get('started', '?')}). Wait for it to finish, "
                "or train into another --out."
            ) from exc
        handle.seek(0)
        previous = _holder(handle.read().decode("utf-8", errors="replace"))
        if previous.get("pid") and previous.get("pid") != os.getpid():
            warnings.warn(
                f"took over the stale lock of process {previous['pid']} on host {previous.get('host', '?')} in "
                f"{str(self.path.parent)!r} (that process is gone).",
                RunDirWarning,
                stacklevel=3,
            )
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        holder_text = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": started})
        try:  # who holds it, for the message a second trainer gets (unbuffered: nothing left to flush)
            handle.seek(0)
            handle.truncate()
            handle.write(holder_text.encode())
        except OSError:
            pass  # a full disk: the lock holds all the same; the writability check before step 1 says why
        RunLock._held[key] = [handle, 1]
        self.acquired = True

    def release(self) -> None:
        if not self.acquired:
            return
        self.acquired = False
        entry = RunLock._held.get(str(self.path))
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del RunLock._held[str(self.path)]
            handle = entry[0]
            try:  # a clean release leaves no holder behind (a killed holder's name stays: stale)
                handle.seek(0)
                handle.truncate()
            except OSError:
                pass  # a full or read-only disk: the file stays as it was, and stays free to take
            handle.close()


def _holder(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


# -- config.json ------------------------------------------------------------------------
def read_json_object(path: Path, what: str = "run config") -> dict[str, Any]:
    """A JSON object from ``path``; anything else is a ``ConfigError`` naming the file."""
    from metaopt.configfile import read_text  # the one UTF-8 reading rule (it names UTF-16 files too)

    text = read_text(path, what)
    if not text.strip():
        raise ConfigError(f"{what} {str(path)!r} is empty.")
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ConfigError(f"{what} {str(path)!r} is not valid JSON: {str(exc)[:200]}.") from exc
    if not isinstance(value, dict):
        raise ConfigError(f"{what} {str(path)!r} must hold a JSON object of settings; got {type(value).__name__}.")
    return value


def config_differences(stored: dict[str, Any], given: dict[str, Any], ignore: tuple[str, ...] = ()) -> list[str]:
    """``key: old -> new`` for each setting that differs (``stored``: the checkpoint's, the truth)."""
    keys = sorted(k for k in {*stored, *given} if k not in ignore and stored.get(k) != given.get(k))
    return [f"{k}: {stored.get(k)!r} -> {given.get(k)!r}" for k in keys]


# -- checkpoints ---------------------------------------------------------------------
def checksum(state: Any) -> str:
    """A digest of a checkpoint's contents: every tensor's dtype, shape and bytes, every value and key."""
    digest = hashlib.blake2b(digest_size=32)
    _feed(digest, state)
    return digest.hexdigest()


def _feed(digest: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        digest.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, dict):
        digest.update(b"D%d" % len(value))
        for key, item in value.items():
            digest.update(repr(key).encode())
            _feed(digest, item)
    elif isinstance(value, list | tuple):
        digest.update(b"L%d" % len(value))
        for item in value:
            _feed(digest, item)
    else:
        digest.update(f"V{type(value).__name__}:{value!r}".encode())


def with_checksum(state: dict[str, Any]) -> dict[str, Any]:
    return {**state, CHECKSUM_KEY: checksum(state)}


def load_verified(path: Path) -> dict[str, Any]:
    """A metaopt checkpoint, checked to be one and to be intact; else a ``CheckpointError`` naming it."""
    state = load_safe(path)
    if not isinstance(state, dict) or any(key not in state for key in CHECKPOINT_KEYS):
        found = sorted(state)[:8] if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(
            f"{str(path)!r} is not a metaopt checkpoint (it holds {found}, not {list(CHECKPOINT_KEYS)}). Remove it "
            "from the run's checkpoints/ folder."
        )
    stored = state.pop(CHECKSUM_KEY, None)
    if stored is None:
        warnings.warn(
            f"{str(path)!r} has no checksum (written before metaopt stored one); not verified.",
            RunDirWarning,
            stacklevel=2,
        )
    elif checksum(state) != stored:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is corrupt: its contents do not match the checksum stored with them (a "
            "flipped bit on disk or in transfer). Use an earlier checkpoint."
        )
    return state


def newest_intact(run_dir: Path) -> tuple[Path, dict[str, Any]]:
    """The newest checkpoint that loads and verifies; each bad newer one is named in a warning."""
    found = checkpoint_files(run_dir)
    if not found:
        raise CheckpointError(f"no checkpoint in {str(run_dir / CHECKPOINT_DIR)!r} to resume from.")
    problems = []
    for path in reversed(found):
        try:
            return path, load_verified(path)
        except CheckpointError as exc:
            problems.append(str(exc))
            warnings.warn(f"skipping {str(path)!r}: {exc}", RunDirWarning, stacklevel=2)
    raise CheckpointError(f"no intact checkpoint in {str(run_dir / CHECKPOINT_DIR)!r}: " + " | ".join(problems))


def sweep_temp_files(run_dir: Path) -> list[Path]:
    """Remove the temp files of checkpoint writes that a kill interrupted (``.NAME.XXXX.tmp``)."""
    swept = []
    for folder in (run_dir, run_dir / CHECKPOINT_DIR, run_dir / "export"):
        if folder.is_dir():
            for tmp in folder.glob(".*.tmp"):
                tmp.unlink(missing_ok=True)
                swept.append(tmp)
    return swept


def free_bytes(path: Path) -> int | None:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return shutil.disk_usage(candidate).free
    return None


def check_writable(run_dir: Path) -> None:
    """Before step 1: the run folder takes a file (else a ``CheckpointError`` saying why)."""
    probe = run_dir / f".write-test-{os.getpid()}.tmp"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"metaopt")
        probe.unlink()
    except OSError as exc:
        raise disk_error(exc, probe, "write to the run folder") from exc


def disk_error(exc: BaseException, path: Path, doing: str) -> CheckpointError:
    """A write failure said plainly: disk full (with the free space), read-only, or what the OS said."""
    code = getattr(exc, "errno", None)
    text = str(exc)
    free = free_bytes(path.parent)
    if code == errno.ENOSPC or "unexpected pos" in text or "No space left" in text:
        reason = f"the disk is full ({free} bytes free)"
    elif code == errno.EROFS:
        reason = "the file system is read-only"
    elif code in (errno.EACCES, errno.EPERM):
        reason = "permission denied"
    elif code == errno.ENOTDIR or code == errno.EEXIST:
        reason = "a file stands where a folder is needed"
    else:
        reason = f"{type(exc).__name__}: {text[:200]}"
    return CheckpointError(f"cannot {doing} ({str(path)!r}): {reason}.")


# -- the metrics log -----------------------------------------------------------------
def truncate_log(log: Path, iteration: int) -> list[str]:
    """Keep the readable lines up to ``iteration``; return a description of each line dropped
    because it could not be read (a torn write, a blank line)."""
    if not log.is_file():
        return []
    kept, dropped = [], []
    for number, line in enumerate(log.read_bytes().decode("utf-8", errors="replace").splitlines(), 1):
        try:
            record = json.loads(line)
            step = int(record["iteration"])
        except (ValueError, TypeError, KeyError):
            dropped.append(f"line {number}: {line[:60]!r}")
            continue
        if step <= iteration:
            kept.append(line)
    tmp = log.with_suffix(".tmp")
    try:
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, log)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise disk_error(exc, log, "rewrite the log") from exc
    return dropped
