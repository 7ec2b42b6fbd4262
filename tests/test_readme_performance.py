"""The README's Performance section keeps its promise: every subsection names the bench script that produced its
numbers (and the script exists), every page it links exists, and every later run's raw JSON has its page beside it."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = re.compile(r"bench/([a-z_]+\.py)")
# The first runs' pages, whose raw JSON the README says was not kept.
PAGES_WITHOUT_JSON = {"benchmark-cpu", "benchmark-h100-qwen2.5-vl-3b", "benchmark-h100-qwen3-vl-4b",
                      "benchmark-h100-qwen2.5-vl-3b-run1", "benchmark-h100-qwen3-vl-4b-run1"}


def performance_sections() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    perf = text[text.index("\n## Performance\n"):]
    perf = perf[:perf.index("\n## ", 5)]
    return re.split(r"\n(?=### )", perf)


def test_every_performance_section_names_an_existing_bench_script():
    intro, *sections = performance_sections()
    assert len(sections) >= 5
    for name in SCRIPT.findall(intro):
        assert (ROOT / "bench" / name).is_file(), name
    for section in sections:
        scripts = SCRIPT.findall(section)
        assert scripts, f"no bench script named in {section.splitlines()[0]!r}"
        assert all((ROOT / "bench" / s).is_file() for s in scripts), (section.splitlines()[0], scripts)


def test_every_linked_benchmark_page_exists_and_raw_json_has_its_page():
    for section in performance_sections():
        for page in re.findall(r"docs/benchmark-[\w.-]+?\.(?:md|json)", section):
            assert (ROOT / page).is_file(), page
    docs = ROOT / "docs"
    pages = {p.stem: p.read_text(encoding="utf-8") for p in docs.glob("benchmark-*.md")}
    raw = {p.stem for p in docs.glob("benchmark-*.json")}
    for stem in raw:  # no raw output without a page: its own, or one that names it
        assert stem in pages or any(f"docs/{stem}.json" in text for text in pages.values()), stem
    assert set(pages) - raw <= PAGES_WITHOUT_JSON, set(pages) - raw - PAGES_WITHOUT_JSON
