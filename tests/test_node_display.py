"""What the nodes show on themselves: the one-line timing summary, warnings, the compact node, output tooltips.

The browser side (web/js/qwenvl_fast.js drawing these) is tested in tests/test_browser.py.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch

from conftest import TINY_FAMILIES  # noqa: F401  (conftest imports the pack as qwenvl_fast)

# The all-in-one node's widgets in the order workflows saved before this change store them (by position).
RUN_INPUT_ORDER = [
    "model", "quantization", "attention_mode", "prompt", "system_prompt", "image_quality", "enable_image_cache",
    "max_new_tokens", "do_sample", "temperature", "top_p", "top_k", "repetition_penalty", "seed", "batch_mode",
    "keep_model_loaded", "image", "video", "video_clip", "dtype", "device", "compile_vision", "backend",
    "server_url", "server_model", "server_max_in_flight", "server_upload_format", "compile_decode", "video_fps",
    "max_frames",
]


@pytest.fixture
def nodes(models_dir, monkeypatch):
    monkeypatch.setenv("QWENVL_FAST_MODELS_DIR", str(models_dir))
    from qwenvl_fast import embedding_cache as caches
    from qwenvl_fast import nodes
    from qwenvl_fast import qwenvl_loader as ql

    caches._CACHES.clear()
    yield nodes
    ql.MANAGER.release()
    caches._CACHES.clear()


def record(**fields):
    from qwenvl_fast.perf_monitor import RunRecord

    return RunRecord(**fields)


def test_summary_line_reads_like_a_sentence_of_figures():
    rec = record(total_s=1.84, images=[{"tokens": 200, "cache": "memory"}, {"tokens": 34, "cache": "disk"}],
                 new_tokens=40, decode_tokens_per_s=12.43)
    assert rec.summary_line() == "1.8 s · 234 visual tokens · cache hit · 40 new tokens · 12.4 tok/s"


def test_summary_line_says_misses_partial_hits_loads_and_interrupts():
    rec = record(total_s=3.0, model_loaded_this_run=True, new_tokens=2, interrupted=True,
                 images=[{"tokens": 10, "cache": "miss"}, {"tokens": 10, "cache": "memory"}],
                 videos=[{"tokens": 50, "cache": "miss"}])
    assert rec.summary_line() == ("3.0 s · model loaded · 70 visual tokens · cache 1/3 hit · 2 new tokens · "
                                  "interrupted")
    assert "cache" not in record(images=[{"tokens": 5, "cache": "off"}]).summary_line()
    assert record(images=[{"tokens": 5, "cache": "miss"}]).summary_line().count("cache miss") == 1


def test_warnings_come_before_tips_and_survive_json():
    from qwenvl_fast.perf_monitor import RunRecord

    rec = record(warnings=["max_new_tokens reduced"], tips=["use balanced"])
    assert rec.notices() == ["max_new_tokens reduced", "use balanced"]
    assert RunRecord.from_json(rec.to_json()).warnings == ["max_new_tokens reduced"]


def test_reduced_max_new_tokens_is_a_warning_on_the_record():
    from qwenvl_fast.engine.generation import Generator

    rec = record()
    fake = types.SimpleNamespace(context_length=100)  # fit_context reads only the context length
    assert Generator.fit_context(fake, 90, 50, rec) == 10
    assert Generator.fit_context(fake, 90, 50, rec) == 10  # a second row of the same run: said once
    assert rec.warnings == ["max_new_tokens reduced from 50 to 10 to fit the model's context of 100 tokens "
                            "(the prompt takes 90)."]
    assert Generator.fit_context(fake, 10, 50, rec) == 50 and len(rec.warnings) == 1


def test_compact_node_has_the_common_inputs_only(nodes):
    spec = nodes.QwenVLFastAsk.INPUT_TYPES()
    assert list(spec["required"]) == ["model", "prompt", "image_quality", "max_new_tokens", "seed",
                                      "keep_model_loaded"]
    assert list(spec["optional"]) == ["image", "video", "video_clip"]
    assert nodes.QwenVLFastAsk.RETURN_NAMES == nodes.QwenVLFastRun.RETURN_NAMES
    assert sys.modules["qwenvl_fast"].NODE_DISPLAY_NAME_MAPPINGS["QwenVLFast_Ask"] == "Qwen-VL Fast"


def test_all_in_one_node_keeps_its_input_order_and_folds_the_rare_ones(nodes):
    spec = nodes.QwenVLFastRun.INPUT_TYPES()
    assert [*spec["required"], *spec["optional"]][:len(RUN_INPUT_ORDER)] == RUN_INPUT_ORDER
    flagged = {name for section in ("required", "optional") for name, (_, opts) in spec[section].items()
               if opts.get("advanced")}
    compact = set(nodes.QwenVLFastAsk.INPUT_TYPES()["required"]) | {"image", "video", "video_clip"}
    assert flagged == set(RUN_INPUT_ORDER) - compact


def test_compact_node_answers_like_the_all_in_one_node_with_defaults(nodes):
    image = torch.rand(1, 64, 96, 3, generator=torch.Generator().manual_seed(1))
    common = dict(model="tiny-qwen2.5-vl", prompt="Describe this image.", image_quality="fast", max_new_tokens=5,
                  seed=0, keep_model_loaded=True, image=image)
    asked = nodes.QwenVLFastAsk().ask(**common)
    spec = nodes.QwenVLFastRun.INPUT_TYPES()
    defaults = {name: opts["default"] for section in ("required", "optional")
                for name, (_, opts) in spec[section].items() if "default" in opts}
    ran = nodes.QwenVLFastRun().run(**{**defaults, **common})
    assert asked["result"][0] == ran["result"][0]
    ui = asked["ui"]
    assert ui["text"] == asked["result"][0]
    assert len(ui["summary"]) == 1 and " s · " in ui["summary"][0] and "visual tokens" in ui["summary"][0]
    assert isinstance(ui["warnings"], list)


def test_cache_info_orders_after_a_job_and_sums_up(nodes):
    spec = nodes.QwenVLFastCacheInfo.INPUT_TYPES()
    assert list(spec["optional"]) == ["after"]
    after_type = spec["optional"]["after"][0]
    assert after_type == "*" and not (after_type != "IMAGE")  # accepts any link
    assert nodes.QwenVLFastCacheInfo.INPUT_IS_LIST  # a list on 'after' runs it once
    out = nodes.QwenVLFastCacheInfo().info([False], [False], after=["caption 1", "caption 2"])
    assert out["result"] == nodes.QwenVLFastCacheInfo().info(False, False)["result"]
    assert out["ui"]["summary"][0].startswith("0 hits (0 memory, 0 disk) · 0 misses · memory 0 entries")
    assert nodes.cache_summary_line({"memory_hits": 3, "disk_hits": 1, "misses": 2, "memory_entries": 4,
                                     "memory_bytes": 3 * 2**20, "disk_enabled": True, "disk_entries": 1,
                                     "disk_bytes": 2**19}) == (
        "4 hits (3 memory, 1 disk) · 2 misses · memory 4 entries, 3.0 MiB · disk 1 entries, 0.5 MiB")


def test_caption_folder_ui_lines_are_bounded_with_errors_first(nodes):
    from qwenvl_fast.captioning.progress import bounded_lines

    lines = [(f"img{i}.png: written", False) for i in range(1000)] + [("bad.png: error: unreadable", True)]
    shown = bounded_lines(lines, limit=50)
    assert len(shown) == 50
    assert shown[0] == "bad.png: error: unreadable"
    assert shown[-1].startswith("... and 952 more files")
    few = [("a.png: written", False), ("b.png: error: x", True)]
    assert bounded_lines(few, limit=50) == ["a.png: written", "b.png: error: x"]
