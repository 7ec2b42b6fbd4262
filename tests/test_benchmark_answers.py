"""The benchmark's 'answers' section (prefix reuse, one answer per image batched, decode vs floor, Caption Folder)
in --quick mode on a tiny model: every row is measured, through the paths it names, and rendered.

No speed is asserted (a tiny model on a shared CPU proves nothing about speed): numbers must be finite and
positive, and the counts the rows stand for must hold (prefix tokens reused or prefilled, generate calls,
vision-tower calls, tokens per answer).
"""

import math

import pytest
import torch

from bench_run import positive, rerender, run_quick

MODEL = "synthetic:tiny-qwen2.5-vl"
PAIRS = {
    "answers.prefix_reuse": ["time_s", "cpu_s", "prefill_s", "decode_s", "prompt_tokens", "prefix_tokens_reused",
                             "speedup_vs_no_reuse", "prefill_speedup", "wall_speedup_vs_no_reuse"],
    "answers.prefix_no_reuse": ["time_s", "cpu_s", "prefill_s", "decode_s", "prompt_tokens",
                                "prefix_tokens_prefilled"],
    "answers.each_one_by_one": ["time_s", "cpu_s", "per_caption_s", "captions_per_s", "speedup_vs_one_by_one"],
    "answers.each_batched": ["time_s", "cpu_s", "per_caption_s", "captions_per_s", "speedup_vs_one_by_one"],
    "answers.folder_one_by_one": ["time_s", "cpu_s", "captions_per_s", "speedup_vs_one_by_one"],
    "answers.folder_batched": ["time_s", "cpu_s", "captions_per_s", "speedup_vs_one_by_one"],
}
GPU_ROWS = ["answers.decode_eager", "answers.decode_auto"]


@pytest.fixture(scope="module")
def answers_run(tmp_path_factory):
    data, md, js, _ = run_quick(tmp_path_factory.mktemp("bench-answers"), "--only", "answers", "--model", MODEL)
    return data, md, js


def test_answers_rows_are_measured_through_their_paths(answers_run):
    data, _, _ = answers_run
    meta, (entry,) = data["meta"], data["models"]
    assert not entry.get("error"), entry.get("error")
    rows = {r["id"]: r for r in entry["rows"]}
    for rid, keys in PAIRS.items():
        row = rows[rid]
        assert row["status"] == "ok", f"{rid}: {row['status']} ({row['reason']})"
        for key in keys:
            assert positive(row["metrics"].get(key)), f"{rid}.{key} = {row['metrics'].get(key)}"
        assert row["info"]["rounds"] >= 1

    reuse, fresh = rows["answers.prefix_reuse"]["metrics"], rows["answers.prefix_no_reuse"]["metrics"]
    assert reuse["prefix_tokens_prefilled"] == 0 and fresh["prefix_tokens_reused"] == 0
    assert reuse["new_tokens"] == fresh["new_tokens"] == meta["new_tokens"]
    # the same image and question: the prompts differ only by the system prompt
    assert reuse["prefix_tokens_reused"] < reuse["prompt_tokens"]
    info = rows["answers.prefix_reuse"]["info"]
    assert 0 < info["lm_head_bytes"] <= info["weight_bytes_per_token"] and positive(info["lm_head_one_token_s"])

    ans = meta["answers"]
    one, batched = rows["answers.each_one_by_one"]["metrics"], rows["answers.each_batched"]["metrics"]
    assert one["new_tokens"] == batched["new_tokens"] == ans["images"] * ans["new_tokens"]
    assert one["generate_calls"] == ans["images"] and batched["generate_calls"] == 1
    assert rows["answers.each_one_by_one"]["metrics"]["speedup_vs_one_by_one"] == 1.0

    first = rows["answers.folder_batched"]["info"]
    assert first["first_pass_vision_calls"] == math.ceil(ans["folder_images"] / 4)  # captioning.CHUNK
    assert ans["folder_cache"] == "warm"  # the CPU default: the timed passes re-caption from the cache

    for rid in GPU_ROWS:
        if torch.cuda.is_available():
            assert rows[rid]["status"] in ("ok", "skipped"), rows[rid]
        else:
            assert rows[rid]["status"] == "skipped" and "GPU only" in rows[rid]["reason"], rows[rid]
    others = [r for r in rows.values() if r["section"] != "answers"]
    assert others and all(r["status"] == "skipped" for r in others)


def test_answers_tables_render_with_the_spread(answers_run, tmp_path):
    data, md, js = answers_run
    for text in ("#### New question on a seen image", "one answer each", "#### Decode per token",
                 "#### Caption Folder", "python bench/benchmark.py --quick --only answers", "(1 round)",
                 "Prefix tokens reused / prefilled", "First pass (every image a miss"):
        assert text in md, text
    assert "### Single" not in md  # --only answers: the other sections' empty tables are left out
    again = rerender(js, tmp_path / "again.md")
    from bench.fmt import fmt_ratio

    speed = {r["id"]: r for r in data["models"][0]["rows"]}["answers.each_batched"]["metrics"]
    assert fmt_ratio(speed["speedup_vs_one_by_one"]) in again  # 2 decimals below 10x, 1 from 10x


def test_spread_is_median_min_max():
    from bench.cli import apply_defaults, build_parser
    from bench.fmt import spread
    from bench.inputs import SECTIONS
    from bench.measure import Row

    row = Row("x", "answers", "x", samples={"s": [1.2, 1.5, 1.4]}, metrics={"s": 1.4})
    assert spread(row, "s") == "1.40x (1.20x-1.50x)"
    assert spread(Row("y", "answers", "y", status="skipped"), "s") == "-"
    args = build_parser().parse_args(["--only", "answers"])
    apply_defaults(args, torch.device("cpu"))
    assert set(args.skip) == set(SECTIONS) - {"answers"}
    assert args.folder_cache == "warm" and args.answers_images == 8 and args.folder_images == 16
