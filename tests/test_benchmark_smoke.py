"""Smoke test of benchmark.py: the --quick run works end to end and reports every row with real numbers.

It checks that the benchmark runs, not a speed: numbers only have to be positive and finite, and the
paths must really have been taken (a cache miss encodes, a hit does not, batched is one encode call...),
which benchmark.py itself asserts while measuring.
"""


import pytest

from bench_run import positive, run_quick

# Written out here (not imported from benchmark.py) so that a row the benchmark stops producing fails.
EXPECTED = {
    "single.reference": ["preprocess_s", "transfer_s", "encode_s", "time_s", "cpu_s", "tokens"],
    "single.ultra": ["time_s", "cpu_s", "encode_s", "tokens", "speedup_vs_ultra", "speedup_vs_reference"],
    "single.high": ["time_s", "cpu_s", "encode_s", "tokens", "speedup_vs_ultra", "speedup_vs_reference"],
    "single.balanced": ["time_s", "cpu_s", "encode_s", "tokens", "speedup_vs_ultra", "speedup_vs_reference"],
    "single.fast": ["time_s", "cpu_s", "encode_s", "tokens", "speedup_vs_ultra", "speedup_vs_reference"],
    "cache.memory_hit": ["time_s", "cpu_s", "miss_s", "miss_cpu_s", "miss_over_hit"],
    "cache.memory_hit_rehash": ["time_s", "cpu_s", "miss_s", "miss_cpu_s", "miss_over_hit"],
    "cache.disk_hit": ["first_s", "time_s", "cpu_s", "miss_over_hit"],
    "hash.no_memo": ["time_s"],
    "hash.memo": ["time_s", "no_memo_over_memo"],
    "multi.one_by_one": ["time_s", "cpu_s", "per_image_s", "speedup_vs_one_by_one"],
    "multi.batched": ["time_s", "cpu_s", "per_image_s", "speedup_vs_one_by_one"],
    "e2e.reference": ["time_s", "cpu_s", "new_tokens"],
    "e2e.pack_miss": ["time_s", "cpu_s", "embed_s", "prefill_s", "decode_s", "new_tokens", "speedup_vs_reference"],
    "e2e.pack_hit": ["time_s", "cpu_s", "prefill_s", "decode_s", "new_tokens", "speedup_vs_reference",
                     "speedup_vs_miss"],
}
QUICK_SKIPPED = ["compile.off", "compile.on"]  # --quick never compiles


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    data, md, _, stdout = run_quick(tmp_path_factory.mktemp("bench"))
    return data, md, stdout


def test_quick_run_reports_every_row_with_positive_numbers(quick_run):
    data, _, _ = quick_run
    assert len(data["models"]) >= 1
    for entry in data["models"]:
        assert not entry.get("error"), entry.get("error")
        rows = {r["id"]: r for r in entry["rows"]}
        for rid, keys in EXPECTED.items():
            assert rid in rows, f"{entry['model']}: row {rid} missing"
            row = rows[rid]
            assert row["status"] == "ok", f"{entry['model']} {rid}: {row['status']} ({row['reason']})"
            for key in keys:
                assert positive(row["metrics"].get(key)), f"{entry['model']} {rid}.{key} = {row['metrics'].get(key)}"
            for key, value in row["metrics"].items():  # the rest: finite, and > 0 unless a microsecond CPU time
                ok = positive(value) or (key.endswith("cpu_s") and value == 0 and rid == "hash.memo")
                assert ok, f"{entry['model']} {rid}.{key} = {value}"
        for rid in QUICK_SKIPPED:
            assert rows[rid]["status"] == "skipped" and rows[rid]["reason"], rows.get(rid)
        # what the rows claim about the paths taken
        assert rows["e2e.pack_miss"]["metrics"]["new_tokens"] == data["meta"]["new_tokens"]
        assert rows["e2e.reference"]["metrics"]["new_tokens"] == data["meta"]["new_tokens"]
        assert rows["single.fast"]["metrics"]["tokens"] <= rows["single.ultra"]["metrics"]["tokens"]
        assert rows["single.reference"]["metrics"]["tokens"] == rows["single.ultra"]["metrics"]["tokens"]
        assert rows["multi.batched"]["metrics"]["tokens"] == rows["multi.one_by_one"]["metrics"]["tokens"]


def test_quick_run_prints_the_tables_and_the_machine(quick_run):
    data, md, stdout = quick_run
    meta = data["meta"]
    for key in ("torch", "transformers", "cpu", "cpu_count"):
        assert meta["machine"].get(key), key
    assert meta["device"] and meta["dtype"]
    for text in (md, stdout):
        assert "| Configuration | Visual tokens | Embedding time |" in text
        assert "| Multi-image (4 images) | Total | Per image |" in text
        assert "| Path | Visual tokens | Preprocess | Transfer | Encode | Total |" in text
        assert "End-to-end generation" in text and "Embedding cache" in text
        assert "python bench/benchmark.py --quick" in text
        for entry in data["models"]:
            assert entry["model"] in text


def test_time_budget_skips_rows_cleanly(tmp_path):
    data = run_quick(tmp_path, "--model", "synthetic:tiny-qwen3-vl", "--time-budget", "0", timeout=300)[0]
    rows = {r["id"]: r for r in data["models"][0]["rows"]}
    assert set(EXPECTED) | set(QUICK_SKIPPED) <= set(rows)
    assert all(r["status"] == "skipped" and "time-budget" in r["reason"] for r in rows.values())
