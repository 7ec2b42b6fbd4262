"""Structured output on the local backend: random weights, so a valid answer can only come from the constraint.

Every tiny family answers JSON that validates (enums, bounded integers, booleans, bounded strings), one prompt,
one answer per image (batched rows, each its own grammar state), a reused prompt prefix, and through Caption
Folder; tag lists match the grammar; a broken schema fails before any model work; without the constraint the
same requests do not give valid JSON.
"""

import json

import pytest
import torch
from structured_cases import SCHEMA, SCHEMA_TEXT

from conftest import TINY_FAMILIES, load_tiny

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

from qwenvl_fast import qwenvl_loader as ql  # noqa: E402
from qwenvl_fast.captioning import METADATA_NAME, CaptionOptions, caption_folder  # noqa: E402
from qwenvl_fast.engine import structured  # noqa: E402


def _images(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(48 + 8 * i, 56, 3, generator=g) for i in range(n)]


def _request(images, **overrides):
    base = dict(prompt="Describe the image as JSON.", images=images, max_new_tokens=80, image_quality="fast",
                monitor=True, output_format="json", json_schema=SCHEMA_TEXT)
    base.update(overrides)
    return ql.GenerationRequest(**base)


def _run(models_dir, family, request):
    return ql.run_once(ql.LoadOptions(model=str(models_dir / family)), request)


def _valid(text, schema=SCHEMA):
    value = json.loads(text)
    jsonschema.validate(value, schema)
    assert text == json.dumps(value, separators=(",", ":"), ensure_ascii=False)  # compact: no runaway whitespace
    return value


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_json_validates_on_every_family(models_dir, family):
    result = _run(models_dir, family, _request(_images(1)))
    _valid(result.text)
    rec = result.record
    assert rec.output_format == "json"
    assert rec.structured["steps"] > 0 and rec.structured["constraint_ms_per_token"] >= 0
    assert '"output_format": "json"' in rec.to_json()


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_one_answer_per_image_each_row_validates(models_dir, family):
    images = _images(3, seed=1)
    result = _run(models_dir, family, _request(images, batch_mode=ql.BATCH_MODES[1]))
    assert len(result.texts) == 3
    for text in result.texts:
        _valid(text)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_tags_match_the_grammar(models_dir, family):
    result = _run(models_dir, family, _request(_images(2, seed=2), output_format="tags", max_new_tokens=60,
                                               batch_mode=ql.BATCH_MODES[1]))
    for text in result.texts:
        assert structured.tags_match(text), text
        tags = text.split(", ")
        assert 1 <= len(tags) <= structured.TAGS_MAX_COUNT
        assert all(len(t) <= structured.TAGS_MAX_CHARS and t == t.strip() and t == t.lower() for t in tags)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_without_the_constraint_random_weights_give_no_valid_json(models_dir, family):
    """The test can fail: the same requests, unconstrained, are not valid JSON."""
    result = _run(models_dir, family, _request(_images(3, seed=1), output_format="text",
                                               batch_mode=ql.BATCH_MODES[1]))
    for text in result.texts:
        with pytest.raises((json.JSONDecodeError, jsonschema.ValidationError)):
            _valid(text)


def test_unbounded_string_closes_within_a_tight_budget(models_dir):
    """No maxLength: the model would write the string until max_new_tokens; the budget closes it in time."""
    schema = {"type": "object", "properties": {"caption": {"type": "string"}, "tags": {
        "type": "array", "items": {"type": "string"}}}, "required": ["caption", "tags"]}
    for budget in (30, 31, 45):
        result = _run(models_dir, "tiny-qwen2.5-vl", _request(_images(2), json_schema=json.dumps(schema),
                                                              max_new_tokens=budget, batch_mode=ql.BATCH_MODES[1]))
        for text in result.texts:
            _valid(text, schema)
        assert result.record.structured["budget_steps"] > 0


def test_empty_schema_means_any_object_and_sampling_works(models_dir):
    result = _run(models_dir, "tiny-qwen3-vl", _request(_images(1), json_schema="", do_sample=True,
                                                        temperature=1.5, top_k=5, top_p=0.9, seed=3))
    assert isinstance(json.loads(result.text), dict)


def test_too_small_budget_is_a_clear_error(models_dir):
    with pytest.raises(ql.QwenVLError, match="max_new_tokens is 10 but the shortest complete answer of the JSON"):
        _run(models_dir, "tiny-qwen2-vl", _request(_images(1), max_new_tokens=10))


@pytest.mark.parametrize("schema, words", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "must be a JSON object"),
    ('{"type": "strin"}', "not a valid JSON Schema"),
    ('{"type": "object", "properties": {"a": {"$ref": "#/nope"}}}', "/nope"),
    ('{"type": "string", "pattern": "(?<=a)b"}', "look"),
])
def test_broken_schema_fails_before_any_model_work(tmp_path, schema, words):
    """The model folder does not even exist: the schema's error comes first, naming what is wrong."""
    with pytest.raises(ql.QwenVLError, match="json_schema") as err:
        ql.run_once(ql.LoadOptions(model=str(tmp_path / "no-such-model")),
                    _request([], json_schema=schema))
    assert words in str(err.value)


def test_unknown_format_is_refused(tmp_path):
    with pytest.raises(ql.QwenVLError, match="Unknown output_format 'yaml'"):
        ql.run_once(ql.LoadOptions(model=str(tmp_path / "x")), _request([], output_format="yaml"))


def test_prefix_reuse_keeps_the_constraint(models_dir):
    model = load_tiny(models_dir, "tiny-qwen2.5-vl")
    if model.prefix_reuse_off_reason:
        pytest.skip(f"no prefix reuse here: {model.prefix_reuse_off_reason}")
    image = _images(1, seed=4)
    first = _run(models_dir, "tiny-qwen2.5-vl", _request(image, prompt="First question?"))
    second = _run(models_dir, "tiny-qwen2.5-vl", _request(image, prompt="Second question?"))
    assert second.record.prefix_tokens_reused > 0
    _valid(first.text)
    _valid(second.text)


def test_from_inputs_picks_up_the_fields():
    req = ql.GenerationRequest.from_inputs({"prompt": "p", "output_format": "tags", "json_schema": "{}",
                                            "json_field": "ignored"})
    assert (req.output_format, req.json_schema) == ("tags", "{}")


def test_padded_vocab_ids_are_never_allowed():
    """The model's vocabulary (512 in the tiny models) is wider than the byte-level tokenizer's: the mask's extra
    ids stay banned, so a token the tokenizer cannot decode is never produced."""
    from qwenvl_fast.sources import synthetic

    tok = synthetic.build_tokenizer()
    spec = structured.parse_output_spec("json", SCHEMA_TEXT, need_grammar=True)
    proc = structured.make_constraint(tok, 1024, {tok.eos_token_id}, spec, rows=1, max_new=80,
                                      stats=structured.ConstraintStats())
    scores = torch.zeros(1, 1024)
    masked = proc(torch.zeros(1, 3, dtype=torch.long), scores)
    allowed = torch.isfinite(masked[0]).nonzero().reshape(-1).tolist()
    assert allowed and max(allowed) < len(tok)
    assert tok.decode(allowed) == "{"


@pytest.mark.parametrize("family", ["tiny-qwen2.5-vl", "tiny-qwen3.5"])
def test_caption_folder_json_field_and_metadata(models_dir, tmp_path, family):
    from PIL import Image

    folder = tmp_path / "pics"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (40 + 8 * i, 48), (40 * i, 90, 200)).save(folder / f"img{i}.png")
    request = _request([], output_format="json", max_new_tokens=80, monitor=False)
    results = caption_folder(ql.LoadOptions(model=str(models_dir / family)), folder, request,
                             caption=CaptionOptions(write_jsonl=True, json_field="caption"))
    assert [r.status for r in results] == ["written"] * 3
    rows = [json.loads(line) for line in (folder / METADATA_NAME).read_text().splitlines()]
    assert len(rows) == 3
    for r, row in zip(results, rows):
        jsonschema.validate(row["json"], SCHEMA)
        # The caption file and the text column hold the field stripped of surrounding whitespace (cleanup.py);
        # the json column keeps the answer's value as generated.
        assert row["text"] == row["json"]["caption"].strip() == r.caption
        assert (folder / f"{r.path.stem}.txt").read_text(encoding="utf-8") == r.caption


def test_caption_folder_tags(models_dir, tmp_path):
    from PIL import Image

    folder = tmp_path / "pics"
    folder.mkdir()
    for i in range(2):
        Image.new("RGB", (40, 48 + 8 * i), (10, 90 * i, 20)).save(folder / f"p{i}.png")
    request = _request([], output_format="tags", max_new_tokens=50, monitor=False)
    results = caption_folder(ql.LoadOptions(model=str(models_dir / "tiny-qwen3-vl")), folder, request)
    for r in results:
        assert r.status == "written" and structured.tags_match(r.caption), r


def test_json_field_without_json_format_is_refused(models_dir, tmp_path):
    with pytest.raises(ql.QwenVLError, match="json_field 'caption' needs output_format json"):
        caption_folder(ql.LoadOptions(model=str(models_dir / "tiny-qwen3-vl")), tmp_path,
                       _request([], output_format="tags"), caption=CaptionOptions(json_field="caption"))


@pytest.mark.parametrize("compiled", [False, True], ids=["static-cache", "compiled-eager-backend"])
def test_compiled_decode_path_keeps_the_constraint(models_dir, compiled):
    """What CUDA's compiled decode does (static cache; torch.compile with Dynamo's eager backend on the CPU): the
    grammar's mask is applied outside the compiled step, so the constrained tokens are the eager ones, one prompt
    and batched rows alike."""
    from transformers import CompileConfig

    from qwenvl_fast.engine import decode_compile as dc

    model = load_tiny(models_dir, "tiny-qwen2.5-vl", dtype="fp32")
    one, rows = _images(1, seed=5), _images(2, seed=6)
    refs = [model.run(_request(one, enable_image_cache=False)),
            model.run(_request(rows, enable_image_cache=False, batch_mode=ql.BATCH_MODES[1]))]
    config = None
    if compiled:
        config = CompileConfig(backend="eager", mode=None)
        config._compile_all_devices = True  # transformers' own switch to compile on the CPU
        torch._dynamo.reset()
    model.decode_compile.release()
    model.decode_compile = dc.DecodeCompile(model.model, "auto", model.device, force_static=True,
                                            compile_config=config, context_length=model.context_length)
    try:
        got = [model.run(_request(one, enable_image_cache=False)),
               model.run(_request(rows, enable_image_cache=False, batch_mode=ql.BATCH_MODES[1]))]
    finally:
        model.decode_compile.release()
        torch._dynamo.reset()
    for ref, result in zip(refs, got):
        assert result.token_ids == ref.token_ids
        assert result.record.decode_compile == ("on" if compiled else "off (static cache without compile)")
        for text in result.texts:
            _valid(text)


def _cli(*args):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    return subprocess.run([sys.executable, str(root / "cli.py"), *args], cwd=root, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ))


def test_cli_output_format_and_schema_file(models_dir, tmp_path):
    schema_file = tmp_path / "schema.json"
    schema_file.write_text(SCHEMA_TEXT)
    done = _cli("--model", str(models_dir / "tiny-qwen3-vl"), "--quality", "fast", "--max-new-tokens", "80",
                "--output-format", "json", "--json-schema", f"@{schema_file}", "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    _valid(out["texts"][0])
    assert out["timing"]["output_format"] == "json"
    bad = _cli("caption-folder", str(tmp_path), "--model", str(models_dir / "tiny-qwen3-vl"),
               "--output-format", "json", "--json-schema", '{"type": 3}')
    assert bad.returncode == 2 and "json_schema is not a valid JSON Schema" in bad.stderr, bad.stderr[-2000:]


def test_cli_caption_folder_json_field(models_dir, tmp_path):
    from PIL import Image

    Image.new("RGB", (48, 40), (200, 10, 10)).save(tmp_path / "red.png")
    done = _cli("caption-folder", str(tmp_path), "--model", str(models_dir / "tiny-qwen2-vl"), "--quality", "fast",
                "--max-new-tokens", "80", "--output-format", "json", "--json-schema", SCHEMA_TEXT,
                "--json-field", "mood", "--jsonl")
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "red.txt").read_text() in SCHEMA["properties"]["mood"]["enum"]
    row = json.loads((tmp_path / METADATA_NAME).read_text())
    jsonschema.validate(row["json"], SCHEMA)


def test_node_inputs_are_optional_and_last():
    """Widget values are saved by position: the new inputs go after every existing one, with text's defaults."""
    from qwenvl_fast import nodes

    # Inputs added after structured output (server_timeout_s, the tag rules) come after it, as they must.
    for cls, tail in [(nodes.QwenVLFastRun, ["output_format", "json_schema", "server_timeout_s"]),
                      (nodes.QwenVLFastGenerate, ["output_format", "json_schema"]),
                      (nodes.QwenVLFastCaptionFolder, ["output_format", "json_schema", "json_field", "exclude_tags",
                                                       "replace_tags"])]:
        types = cls.INPUT_TYPES()
        assert list(types["optional"])[-len(tail):] == tail
        assert not set(tail) & set(types["required"])
        assert types["optional"]["output_format"][0] == ["text", "json", "tags"]
        assert types["optional"]["output_format"][1]["default"] == "text"
        assert types["optional"]["json_schema"][1] == {**types["optional"]["json_schema"][1], "multiline": True,
                                                        "default": ""}


def test_run_node_answers_json_per_image(models_dir, monkeypatch):
    """The Run node (outside a server): inputs as ComfyUI passes them, one answer per image, the timing JSON."""
    monkeypatch.setenv("QWENVL_FAST_MODELS_DIR", str(models_dir))
    from qwenvl_fast import nodes

    out = nodes.QwenVLFastRun().run(
        model="tiny-qwen3.5" if "tiny-qwen3.5" in TINY_FAMILIES else TINY_FAMILIES[0], quantization="none",
        attention_mode="auto", prompt="Describe.", system_prompt="", image_quality="fast", enable_image_cache=True,
        max_new_tokens=80, do_sample=False, temperature=0.7, top_p=0.9, top_k=50, repetition_penalty=1.0, seed=0,
        batch_mode="one answer per image", keep_model_loaded=True, image=torch.rand(2, 40, 48, 3),
        output_format="json", json_schema=SCHEMA_TEXT)
    texts, _, timing = out["result"]
    assert len(texts) == 2 and all(_valid(t) for t in texts)
    assert json.loads(timing)["output_format"] == "json"
    assert json.loads(timing)["structured"]["constraint_ms_per_token"] > 0
