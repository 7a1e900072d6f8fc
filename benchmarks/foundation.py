"""Acceptance runs of the foundation through the CLI; writes docs/benchmarks/foundation.{md,json}.

    python benchmarks/foundation.py [--omniglot ../shared/data/omniglot] [--sin-iters 5000] [--omni-iters 1000]

Runs: sinusoid 10-shot (MLP 40-40, alpha=0.01, 1 step, meta-batch 25) and, when the archive is
there, Omniglot small1 5-way 1-shot conv4 (test = held-out alphabets).  Every number in the
Markdown comes from this run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common import DOCS, ROOT, SHARED_DATA, device_name, fmt, shown, train_eval, write_json


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--omniglot", default=str(SHARED_DATA))
    parser.add_argument("--sin-iters", type=int, default=5000)
    parser.add_argument("--omni-iters", type=int, default=1000)
    parser.add_argument("--out", default=str(ROOT / "runs" / "foundation"))
    parser.add_argument("--docs", default=str(DOCS), help="folder for foundation.md/.json")
    args = parser.parse_args()
    out, docs = Path(args.out), Path(args.docs)
    sinusoid = ["--data", "sinusoid", "--shots", "10", "--query", "10", "--inner-lr", "0.01", "--inner-steps", "1"]
    sinusoid += ["--meta-batch", "25", "--iterations", str(args.sin_iters), "--checkpoint-every", "0"]
    results = [{"name": "sinusoid 10-shot", **train_eval(out / "sinusoid", sinusoid, [1, 10])}]
    archive = Path(args.omniglot) / "images_background_small1.zip"
    if archive.is_file():
        omni = ["--data", f"omniglot:{archive}", "--ways", "5", "--shots", "1", "--query", "15", "--inner-lr", "0.4"]
        omni += ["--meta-batch", "16", "--iterations", str(args.omni_iters), "--checkpoint-every", "0"]
        results.append({"name": "Omniglot small1 5-way 1-shot conv4", **train_eval(out / "omniglot", omni, [1, 3])})
    write_json(docs / "foundation.json", {"device": device_name(), "runs": results})
    lines = [
        "# Foundation acceptance runs",
        "",
        f"Produced by `python benchmarks/foundation.py {' '.join(sys.argv[1:])}` on {device_name()}. 600 test tasks each",
        "(sinusoid: fresh functions from another seed; Omniglot: the held-out alphabets of small1,",
        "the last fifth in sorted order). ± is the 95% confidence half-width. 'unadapted' is the",
        "meta-learned initialisation with 0 inner steps on the same test tasks.",
        "",
        "| run | training flags | train wall (s) | eval steps | adapted | unadapted |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        for steps, e in r["evals"].items():
            base = e["unadapted"]
            key = "accuracy" if "accuracy" in e else "mse"
            lines.append(
                f"| {r['name']} | `{shown(' '.join(r['train_args']))}` | {r['train_wall_s']} | {steps} | {key} {fmt(e)} | "
                f"{base[key]:.4f} ± {base['ci95']:.4f} |"
            )
    if not archive.is_file():
        lines.append(f"\nOmniglot skipped: {archive} not found.")
    (docs / "foundation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
