"""Every node has a help page (web/docs/<NodeClass>.md, what ComfyUI's frontend shows in its node help) that names
each of the node's inputs and outputs, and has the sections a newcomer needs.

The page in the frontend's own help panel is tested in tests/test_browser.py.
"""

from __future__ import annotations

import re

import pytest

from conftest import ROOT  # noqa: F401  (conftest imports the pack as qwenvl_fast)

DOCS = ROOT / "web" / "docs"
SECTIONS = ("## Inputs", "## Outputs", "## Example", "## Tips")


def _nodes():
    from qwenvl_fast import nodes

    return nodes.NODE_CLASS_MAPPINGS, nodes.NODE_DISPLAY_NAME_MAPPINGS


@pytest.mark.parametrize("node_class", sorted(_nodes()[0]))
def test_every_node_has_a_page_naming_each_input_and_output(node_class):
    mappings, display = _nodes()
    page = DOCS / f"{node_class}.md"
    assert page.is_file(), f"no help page for {node_class}: write {page.relative_to(ROOT)}"
    text = page.read_text(encoding="utf-8")
    assert text.startswith(f"# {display[node_class]}\n"), "the page's title is the node's display name"
    for section in SECTIONS:
        assert section in text, f"{page.name} lacks its '{section}' section"
    cls = mappings[node_class]
    spec = cls.INPUT_TYPES()
    inputs = [name for part in ("required", "optional") for name in spec.get(part, {})]
    named = set(re.findall(r"^\| `([^`]+)`", text, flags=re.MULTILINE))  # the first cell of each table row
    missing = [name for name in inputs if name not in named]
    assert not missing, f"{page.name} does not describe the input(s) {missing}"
    outputs = list(getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES)
    missing = [name for name in outputs if name not in named]
    assert not missing, f"{page.name} does not describe the output(s) {missing}"
    stale = sorted(named - set(inputs) - set(outputs))
    assert not stale, f"{page.name} describes inputs or outputs the node does not have: {stale}"


def test_no_page_for_a_node_that_does_not_exist():
    pages = {p.stem for p in DOCS.glob("*.md")}
    assert pages == set(_nodes()[0])
