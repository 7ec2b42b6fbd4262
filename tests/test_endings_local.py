"""How a local answer ended: a stop token is complete, max_new_tokens (or the context) cuts, an open <think> stays open.

Tiny real models (random weights). To make an answer end on a stop token where the test wants it, a forward hook
on the real output layer raises the end-of-turn logit; ``min_new_tokens`` then decides where that end comes
(transformers forbids the stop tokens before it), ``max_new_tokens`` whether it comes at all.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import TINY_FAMILIES, load_tiny, tiny_request
from qwenvl_fast import qwenvl_loader as ql
from qwenvl_fast.core.api import COMPLETE, CUT, THINKING_OPEN
from qwenvl_fast.perf_monitor import RunRecord

FAMILY = "tiny-qwen2.5-vl" if "tiny-qwen2.5-vl" in TINY_FAMILIES else TINY_FAMILIES[0]


def _image(level: float = 0.5) -> torch.Tensor:
    return torch.full((56, 56, 3), level)


def _end_of_turn(model) -> int:
    return int(model.tokenizer.convert_tokens_to_ids("<|im_end|>"))


def _favour(model, token: int, rows: set[int] | None = None):
    """Make ``token`` the model's first choice at every step (in ``rows`` of a batch only, when given)."""
    def hook(_module, _inputs, logits):
        logits = logits.clone()
        for r in range(logits.shape[0]):
            if rows is None or r in rows:
                logits[r, :, token] = logits[r].abs().max() + 100.0
        return logits

    return model.model.get_output_embeddings().register_forward_hook(hook)


def test_a_stop_token_is_complete_and_max_new_tokens_is_a_cut(models_dir):
    model = load_tiny(models_dir, FAMILY)
    cut = model.run(tiny_request([_image()], monitor=True))  # min = max = 8: no stop token can come
    assert cut.endings == [CUT] and not cut.is_complete(0) and len(cut.token_ids[0]) == 8
    assert "the answer was cut at max_new_tokens=8: raise max_new_tokens" in cut.record.warnings
    assert RunRecord.from_json(cut.record.to_json()).endings == [CUT]
    handle = _favour(model, _end_of_turn(model))
    try:
        done = model.run(tiny_request([_image()], min_new_tokens=3, max_new_tokens=8, monitor=True))
        short = model.run(tiny_request([_image()], min_new_tokens=3, max_new_tokens=3, monitor=True))
    finally:
        handle.remove()
    assert done.endings == [COMPLETE] and done.is_complete(0)
    assert len(done.token_ids[0]) == 4 and done.token_ids[0][-1] == _end_of_turn(model)
    assert not done.record.warnings
    assert short.endings == [CUT] and len(short.token_ids[0]) == 3  # the stop token would have been the 4th


def test_batched_rows_each_carry_their_own_ending(models_dir):
    model = load_tiny(models_dir, FAMILY)
    images = [_image(0.1), _image(0.5), _image(0.9)]
    handle = _favour(model, _end_of_turn(model), rows={1})
    try:
        result = model.run(tiny_request(images, batch_mode=ql.BATCH_MODES[1], min_new_tokens=2, max_new_tokens=6,
                                        monitor=True))
    finally:
        handle.remove()
    assert result.endings == [CUT, COMPLETE, CUT]
    assert [len(ids) for ids in result.token_ids] == [6, 3, 6]
    warnings = result.record.warnings
    assert "answer 1 of 3 was cut at max_new_tokens=6: raise max_new_tokens" in warnings
    assert "answer 3 of 3 was cut at max_new_tokens=6: raise max_new_tokens" in warnings
    assert not any("answer 2 of 3" in w for w in warnings)
    assert "2 cut" in result.record.summary_line()


def test_an_answer_cut_where_the_context_ends_says_so(models_dir):
    model = load_tiny(models_dir, FAMILY)
    first = model.run(tiny_request([_image()], monitor=True))
    saved = model.generation.context_length
    model.generation.context_length = first.record.prompt_tokens + 5  # room for 5 of the 8 new tokens
    try:
        result = model.run(tiny_request([_image()], monitor=True))
    finally:
        model.generation.context_length = saved
    assert result.endings == [CUT] and len(result.token_ids[0]) == 5
    assert any("max_new_tokens reduced from 8 to 5" in w for w in result.record.warnings)
    assert any("was cut at 5 new tokens, where the model's context ends" in w for w in result.record.warnings)


def _copy_model(models_dir, tmp_path, name: str):
    folder = tmp_path / name
    shutil.copytree(models_dir / FAMILY, folder)
    return folder


def test_a_folder_whose_generation_config_names_no_stop_token_stops_at_the_end_of_turn(models_dir, tmp_path):
    folder = _copy_model(models_dir, tmp_path, "no-eos")
    config_path = folder / "generation_config.json"
    config = json.loads(config_path.read_text())
    config.pop("eos_token_id", None)
    config_path.write_text(json.dumps(config))
    model, _ = ql.MANAGER.get(ql.LoadOptions(model=str(folder)))
    assert model.model.generation_config.eos_token_id is None  # the folder is what the test says it is
    end = _end_of_turn(model)
    assert end in model.generation.eos_ids()
    handle = _favour(model, end)
    try:
        one = model.run(tiny_request([_image()], min_new_tokens=2, max_new_tokens=8, monitor=True))
        rows = model.run(tiny_request([_image(0.2), _image(0.8)], batch_mode=ql.BATCH_MODES[1], min_new_tokens=2,
                                      max_new_tokens=8, monitor=True))
    finally:
        handle.remove()
    assert one.endings == [COMPLETE] and one.token_ids[0] == one.token_ids[0][:2] + [end]
    assert "<|im_end|>" not in one.texts[0]
    assert rows.endings == [COMPLETE, COMPLETE] and [len(ids) for ids in rows.token_ids] == [3, 3]


@pytest.mark.parametrize("stop", [False, True])
def test_a_template_that_opens_think_gives_thinking_open_until_think_closes(models_dir, tmp_path, stop):
    folder = _copy_model(models_dir, tmp_path, "thinking")
    template = folder / "chat_template.jinja"
    text = template.read_text()
    assert "<|im_start|>assistant\n" in text
    template.write_text(text.replace("<|im_start|>assistant\n", "<|im_start|>assistant\n<think>\n"))
    model, _ = ql.MANAGER.get(ql.LoadOptions(model=str(folder)))
    handle = _favour(model, _end_of_turn(model)) if stop else None
    try:
        result = model.run(tiny_request([_image()], min_new_tokens=3, max_new_tokens=8, monitor=True))
    finally:
        if handle is not None:
            handle.remove()
    assert model.prompts.opens_thinking
    assert result.endings == [THINKING_OPEN] and result.texts == [""] and not result.is_complete(0)
    assert any("ended while still reasoning" in w for w in result.record.warnings)
    closing = int(model.tokenizer.convert_tokens_to_ids("</think>"))
    handle = _favour(model, closing, rows=None)
    try:  # </think> at every step: the reasoning closes at once and the answer follows
        closed = model.run(tiny_request([_image()], min_new_tokens=8, max_new_tokens=8, monitor=True))
    finally:
        handle.remove()
    assert closed.endings == [CUT]  # closed, then cut by max_new_tokens (min = max)


# ------------------------------------------------------------------------------------------ where the user sees it
NODE_INPUTS = dict(quantization="none", attention_mode="auto", prompt="Describe this image.", system_prompt="",
                   image_quality="fast", enable_image_cache=True, do_sample=False, temperature=0.7, top_p=0.9,
                   top_k=50, repetition_penalty=1.0, seed=0, keep_model_loaded=True)


def test_run_and_generate_nodes_return_a_cut_answer_with_a_warning(models_dir, monkeypatch):
    monkeypatch.setenv("QWENVL_FAST_MODELS_DIR", str(models_dir))
    from qwenvl_fast import nodes

    images = torch.stack([_image(0.2), _image(0.7)])
    out = nodes.QwenVLFastRun().run(model=FAMILY, image=images, max_new_tokens=5, min_new_tokens=5,
                                    batch_mode=ql.BATCH_MODES[1], **NODE_INPUTS)
    texts, _, timing = out["result"]
    record = json.loads(timing)
    assert len(texts) == 2 and record["endings"] == [CUT, CUT]  # returned, not dropped
    for n in (1, 2):
        note = f"answer {n} of 2 was cut at max_new_tokens=5: raise max_new_tokens"
        assert note in out["ui"]["warnings"] and note in record["warnings"]
    assert "2 cut" in out["ui"]["summary"][0]
    (handle,) = nodes.QwenVLFastLoadModel().load(model=FAMILY, quantization="none", attention_mode="auto",
                                                 dtype="auto", device="auto", compile_vision="off",
                                                 keep_model_loaded=True)
    inputs = {k: v for k, v in NODE_INPUTS.items() if k not in ("quantization", "attention_mode",
                                                                 "keep_model_loaded")}
    gen = nodes.QwenVLFastGenerate().generate(qwenvl_model=handle, image=images[:1], max_new_tokens=4,
                                              batch_mode=ql.BATCH_MODES[0], **inputs)
    assert json.loads(gen["result"][2])["endings"] == [CUT]
    assert "the answer was cut at max_new_tokens=4: raise max_new_tokens" in gen["ui"]["warnings"]


def test_the_cli_prints_how_each_answer_ended(models_dir):
    import subprocess
    import sys

    from conftest import ROOT

    proc = subprocess.run([sys.executable, str(ROOT / "cli.py"), "--model", str(models_dir / FAMILY),
                           "--max-new-tokens", "3", "--min-new-tokens", "3", "--quality", "fast"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--- answer 1: 3 new tokens, cut ---" in proc.stdout, proc.stdout
    assert "warning: the answer was cut at max_new_tokens=3: raise max_new_tokens" in proc.stdout
