"""Generated documentation stays in step with the code."""

from __future__ import annotations

from pathlib import Path

from metaopt.hookspecs import HOOK_ORDER, reference_markdown

DOC = Path(__file__).resolve().parents[1] / "docs" / "writing-plugins.md"


def test_hook_reference_in_docs_is_generated_from_the_specs():
    text = DOC.read_text()
    start = text.index("<!-- hook-reference:start -->\n") + len("<!-- hook-reference:start -->\n")
    end = text.index("<!-- hook-reference:end -->")
    assert text[start:end] == reference_markdown(), "regenerate with `metaopt hooks`"
    for name in HOOK_ORDER:
        assert f"`{name}(" in text[start:end]


ROOT = DOC.parents[1]


def test_papers_are_cited_with_their_venue_and_arxiv_number():
    shot = [ROOT / "README.md", ROOT / "docs" / "algorithms" / "shot.md", ROOT / "plugins" / "shot.py"]
    for path in shot:
        text = path.read_text()
        assert "NeurIPS 2023" in text and "NeurIPS 2022" not in text, path
    assert "2310.02751" in (ROOT / "docs" / "algorithms" / "shot.md").read_text()
    first_order = (ROOT / "docs" / "algorithms" / "first_order.md").read_text()
    assert "Chayti & Jaggi" in first_order and "2409.03682" in first_order
