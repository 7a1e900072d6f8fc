"""The README is a front page: short, its examples run as written, its results link to their pages."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def block(language: str, after: str) -> str:
    rest = README[README.index(after) :]
    return re.search(rf"```{language}\n(.*?)```", rest, flags=re.S).group(1)


def test_the_front_page_is_short_and_in_order():
    assert len(README.splitlines()) <= 95
    order = ["| plugin |", "## Set-up", "## Library example", "## CLI example", "## Results", "speed_summary.png"]
    positions = [README.index(marker) for marker in order]
    assert positions == sorted(positions)


def test_every_result_row_links_to_its_page_and_gives_its_command():
    table = README[README.index("## Results") :].split("\n\n")[1]
    rows = [line for line in table.splitlines()[2:] if line.startswith("|")]
    assert len(rows) >= 6
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == 5, row
        claim, result, seeds, device, details = cells
        link = re.search(r"\]\((docs/benchmarks/[^)]+\.md)\)", details)
        assert link and (ROOT / link.group(1)).is_file(), row
        assert "`python benchmarks/" in details or "same" in details, row
        assert seeds and device, row


def test_the_library_example_runs(monkeypatch):
    code = block("python", "## Library example").replace(
        "range(1000)", "range(3)"
    )  # 3 iterations, as written otherwise
    printed = []
    monkeypatch.setattr("builtins.print", lambda *args, **kwargs: printed.append(args))
    exec(compile(code, "README library example", "exec"), {})
    (metrics,) = printed[0]
    assert 0 < metrics["query_loss"] < float("inf"), metrics


def test_the_cli_example_runs(tmp_path, monkeypatch, omniglot_dir, capsys):
    """Every line of the CLI example, in order, with the iteration counts cut to a few and the Omniglot
    archive pointing at the shared small1 archive."""
    from metaopt.cli import main

    monkeypatch.chdir(tmp_path)
    archive = str(omniglot_dir / "images_background_small1.zip")
    for line in block("bash", "## CLI example").strip().splitlines():
        command = line.split("  #")[0].strip()
        for part in command.split(" && "):
            argv = shlex.split(part.replace("images_background.zip", archive))
            assert argv[0] == "metaopt"
            argv = ["2" if a in ("3000", "2000") and argv[i - 1] == "--iterations" else a for i, a in enumerate(argv)]
            if argv[1] == "train" and "--iterations" not in argv:
                argv += ["--iterations", "2"]
            if "--resume" in argv:
                argv[argv.index("--iterations") + 1] = "3"
            if argv[1] == "train":
                argv.append("--no-progress")
            assert main(argv[1:]) == 0, part
    out = capsys.readouterr().out
    assert '"mse"' in out
    assert json.loads((tmp_path / "runs" / "omni" / "config.json").read_text())["iterations"] == 3


@pytest.mark.parametrize("image", ["speed_summary.png", "seeds-omniglot5.png"])
def test_the_plots_on_the_front_page_exist(image):
    assert (ROOT / "docs" / "benchmarks" / image).is_file()
