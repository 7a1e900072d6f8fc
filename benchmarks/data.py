"""Episode throughput and memory: lazily loaded image folders (0, 1, 2 workers) vs the in-memory sampler.

Generates a class-per-folder set of synthetic 84x84 RGB JPEGs (no download), then, each in its
own process (so peak resident memory is that configuration's alone): tasks per second of
5-way 1-shot 15-query episodes, and the peak resident set.

    python benchmarks/data.py          # writes docs/benchmarks/data.{md,json}
    python benchmarks/data.py --configs "lazy, 0 workers" "lazy, 2 workers"   # some configurations only
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import DOCS, SHARED_DATA, device_name, status_mib, write_json  # noqa: E402

CONFIGS = ["in-memory (EpisodeSampler, float32)", "lazy, 0 workers", "lazy, 1 worker", "lazy, 2 workers"]
OMNIGLOT = ["omniglot small1, in-memory (EpisodeSampler)", "omniglot small1, lazy (0 workers)"]


def make_folder(root: Path, classes: int, per_class: int, size: int = 84) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(classes):
        folder = root / f"class{c:03d}"
        folder.mkdir(parents=True)
        base = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
        for i in range(per_class):
            noise = rng.integers(0, 40, (size, size, 3), dtype=np.uint8)
            Image.fromarray(base // 2 + noise).save(folder / f"{i:03d}.jpg", quality=90)


def worker(config: str, root: str, tasks: int) -> dict[str, float]:
    """One configuration in this process: tasks/s after a warm-up; resident memory the data adds."""
    import torch

    torch.set_num_threads(1)
    from metaopt.data.episodes import EpisodeSampler
    from metaopt.data.images import load_image_folder, load_omniglot
    from metaopt.data.sources import make_sampler

    baseline = status_mib("VmRSS")  # torch, metaopt and friends imported
    kwargs = dict(ways=5, shots=1, query=15, seed=0, image_size=84)
    start = time.perf_counter()
    if config.startswith("omniglot"):  # root: the archive; 28 px, as the Omniglot rows train
        kwargs["image_size"] = 28
        if "in-memory" in config:
            sampler = EpisodeSampler(load_omniglot(root), ways=5, shots=1, query=15, seed=0)
        else:
            sampler = make_sampler(f"omniglot:{root}", split="all", **kwargs)
    elif config.startswith("in-memory"):
        classes = load_image_folder(root, size=84, channels=3)
        sampler = EpisodeSampler(classes, ways=5, shots=1, query=15, seed=0)
    else:
        workers = int(config.split(",")[1].split()[0])
        sampler = make_sampler(f"folder:{root}", split="all", channels=3, workers=workers, **kwargs)
    sampler.sample(10)  # warm-up (worker start)
    setup = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(tasks // 10):
        sampler.sample(10)
    elapsed = time.perf_counter() - start
    peak = status_mib("VmHWM")
    return {"tasks_per_s": tasks / elapsed, "setup_s": setup, "peak_rss_mib": peak, "data_mib": peak - baseline}


def render(rows: dict[str, dict[str, float]], meta: dict[str, object]) -> str:
    lines = [
        "# Episode throughput and memory",
        "",
        f"Produced by `{' '.join(['python benchmarks/data.py', str(meta['argv'])]).strip()}` on {meta['device']}, "
        f"{meta['date']}.",
        "",
        f"{meta['classes']} classes x {meta['per_class']} synthetic 84x84 RGB JPEGs ({meta['images']} files, "
        f"{meta['folder_mib']:.1f} MiB on disk); 5-way 1-shot 15-query tasks; {meta['tasks']} timed tasks after 10 "
        "warm-up tasks; each configuration in its own process (one torch thread). Memory: the training "
        "process's peak resident set (`VmHWM`) and how much of it the data adds over the process after its "
        "imports; DataLoader workers are forked processes (not counted here; they load one task at a time). "
        "The Omniglot rows (when `../shared/data/omniglot` is there) read `images_background_small1.zip` at 28 px; "
        "the lazy reader decodes each image on first use, so its rate rises as its cache fills.",
        "",
        "| configuration | tasks / s | set-up (s) | peak RSS (MiB) | added by the data (MiB) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['tasks_per_s']:.1f} | {r['setup_s']:.1f} | {r['peak_rss_mib']:.0f} | {r['data_mib']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--classes", type=int, default=64)
    parser.add_argument("--per-class", type=int, default=60)
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--docs", type=Path, default=DOCS)
    parser.add_argument(
        "--configs",
        nargs="+",
        choices=CONFIGS + OMNIGLOT,
        metavar="CONFIG",
        help="configurations to run (default: all; the Omniglot ones when the archive is there): "
        + "; ".join(CONFIGS + OMNIGLOT),
    )
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    omniglot = SHARED_DATA / "images_background_small1.zip"
    if args.configs is None:
        args.configs = CONFIGS + (OMNIGLOT if omniglot.is_file() else [])
    elif asked := [c for c in args.configs if c in OMNIGLOT and not omniglot.is_file()]:
        parser.error(f"{asked} read {omniglot}, which is not there (leave them out of --configs)")
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.worker[1], int(args.worker[2]))))
        return
    rows = {}
    with tempfile.TemporaryDirectory(prefix="metaopt-data-") as tmp:
        root = Path(tmp) / "images"
        make_folder(root, args.classes, args.per_class)
        size = sum(p.stat().st_size for p in root.rglob("*.jpg")) / 2**20
        runs = [(c, root) for c in CONFIGS if c in args.configs]
        runs += [(c, omniglot) for c in OMNIGLOT if c in args.configs]
        for config, source in runs:
            cmd = [sys.executable, __file__, "--worker", config, str(source), str(args.tasks)]
            out = subprocess.run(
                cmd, capture_output=True, text=True, check=True, env={"OMP_NUM_THREADS": "1", "PATH": ""}
            )
            rows[config] = json.loads(out.stdout.strip().splitlines()[-1])
            print(config, rows[config], flush=True)
    meta = {
        "argv": " ".join(sys.argv[1:]),
        "device": device_name(),
        "date": time.strftime("%Y-%m-%d"),
        "classes": args.classes,
        "per_class": args.per_class,
        "images": args.classes * args.per_class,
        "folder_mib": size,
        "tasks": args.tasks,
    }
    write_json(args.docs / "data.json", {"rows": rows, **meta})
    (args.docs / "data.md").write_text(render(rows, meta))


if __name__ == "__main__":
    main()
