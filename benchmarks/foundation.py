"""Acceptance runs of the foundation through the CLI; writes docs/benchmarks/foundation.md.

    python benchmarks/foundation.py [--omniglot ../shared/data/omniglot] [--sin-iters 3000] [--omni-iters 600]

Runs: sinusoid 10-shot (MLP 40-40, alpha=0.01, 1 step, meta-batch 25) and, when the archive is
there, Omniglot small1 5-way 1-shot conv4 (test = held-out alphabet).  Every number in the
Markdown comes from this run.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(args: list[str]) -> str:
    cmd = [sys.executable, "-m", "metaopt.cli", *args]
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def train_eval(name: str, out: Path, train_args: list[str], steps: list[int]) -> dict:
    start = time.perf_counter()
    run(["train", "--out", str(out), "--overwrite", "--no-progress", *train_args])
    wall = time.perf_counter() - start
    evals = {s: json.loads(run(["eval", str(out), "--tasks", "600", "--steps", str(s), "--json"])) for s in steps}
    return {"name": name, "train_args": train_args, "wall_s": round(wall, 1), "evals": evals}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--omniglot", default=str(ROOT.parent / "shared" / "data" / "omniglot"))
    parser.add_argument("--sin-iters", type=int, default=3000)
    parser.add_argument("--omni-iters", type=int, default=600)
    parser.add_argument("--out", default=str(ROOT / "runs" / "foundation"))
    args = parser.parse_args()
    out = Path(args.out)
    results = [
        train_eval(
            "sinusoid 10-shot",
            out / "sinusoid",
            [
                "--data",
                "sinusoid",
                "--shots",
                "10",
                "--query",
                "10",
                "--inner-lr",
                "0.01",
                "--inner-steps",
                "1",
                "--meta-batch",
                "25",
                "--iterations",
                str(args.sin_iters),
                "--checkpoint-every",
                "0",
            ],
            [1, 10],
        )
    ]
    archive = Path(args.omniglot) / "images_background_small1.zip"
    if archive.is_file():
        results.append(
            train_eval(
                "Omniglot small1 5-way 1-shot conv4",
                out / "omniglot",
                [
                    "--data",
                    f"omniglot:{archive}",
                    "--ways",
                    "5",
                    "--shots",
                    "1",
                    "--query",
                    "15",
                    "--inner-lr",
                    "0.4",
                    "--meta-batch",
                    "16",
                    "--iterations",
                    str(args.omni_iters),
                    "--checkpoint-every",
                    "0",
                ],
                [1, 3],
            )
        )
    (ROOT / "docs" / "benchmarks" / "foundation.json").write_text(json.dumps(results, indent=2))
    lines = [
        "# Foundation acceptance runs",
        "",
        f"Produced by `python benchmarks/foundation.py` on {platform.processor() or platform.machine()}, "
        f"CPU only, 2 cores, torch threads default. 600 test tasks each; ± is the 95% CI half-width.",
        "",
        "| run | training | wall (s) | eval steps | metric | adapted | unadapted |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        for steps, e in r["evals"].items():
            key = "accuracy" if "accuracy" in e else "mse"
            lines.append(
                f"| {r['name']} | `{' '.join(r['train_args'])}` | {r['wall_s']} | {steps} | {key} | "
                f"{e[key]:.4f} ± {e['ci95']:.4f} | {e['unadapted'][key]:.4f} ± {e['unadapted']['ci95']:.4f} |"
            )
    if not archive.is_file():
        lines.append(f"\nOmniglot skipped: {archive} not found.")
    (ROOT / "docs" / "benchmarks" / "foundation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
