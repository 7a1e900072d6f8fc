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
