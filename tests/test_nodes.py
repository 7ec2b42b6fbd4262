"""The pack end to end through its ComfyUI node classes (outside a server), on tiny real models."""

from __future__ import annotations

import gc
import json
import sys
import weakref

import pytest
import torch

from conftest import ROOT, TINY_FAMILIES


@pytest.fixture(scope="module")
def pack():
    """The repository imported as a package, the way ComfyUI imports a custom node folder (conftest did it)."""
    return sys.modules["qwenvl_fast"]


@pytest.fixture
def nodes(pack, models_dir, monkeypatch):
    monkeypatch.setenv("QWENVL_FAST_MODELS_DIR", str(models_dir))
    from qwenvl_fast import embedding_cache as caches
    from qwenvl_fast import nodes
    from qwenvl_fast import qwenvl_loader as ql

    caches._CACHES.clear()
    yield nodes
    ql.MANAGER.release()
    caches._CACHES.clear()


def run_node(nodes, model, image=None, **overrides):
    kwargs = dict(
        model=model, quantization="none", attention_mode="auto", prompt="Describe this image.", system_prompt="",
        image_quality="fast", enable_image_cache=True, max_new_tokens=6, do_sample=False, temperature=0.7,
        top_p=0.9, top_k=50, repetition_penalty=1.0, seed=0, batch_mode="one prompt, all images",
        keep_model_loaded=True, image=image,
    )
    kwargs.update(overrides)
    out = nodes.QwenVLFastRun().run(**kwargs)
    texts, thinking, timing = out["result"]
    return texts, thinking, json.loads(timing), out["ui"]


def image_batch(n=1, h=96, w=128, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, h, w, c, generator=g)


def test_node_mappings_and_tooltips(pack):
    assert set(pack.NODE_CLASS_MAPPINGS) == {
        "QwenVLFast_Ask", "QwenVLFast_Run", "QwenVLFast_LoadModel", "QwenVLFast_Generate", "QwenVLFast_CacheInfo",
        "QwenVLFast_CaptionFolder",
    }
    for cls in pack.NODE_CLASS_MAPPINGS.values():
        spec = cls.INPUT_TYPES()
        for section in ("required", "optional"):
            for name, entry in spec.get(section, {}).items():
                assert len(entry) == 2 and entry[1].get("tooltip"), f"{cls.__name__}.{name} has no tooltip"
        assert len(cls.RETURN_TYPES) == len(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES))
        tips = getattr(cls, "OUTPUT_TOOLTIPS", ())
        assert len(tips) == len(cls.RETURN_TYPES) and all(tips), f"{cls.__name__} outputs without tooltips"


def test_model_choices_list_local_folders_and_known_repos(nodes, models_dir):
    choices = nodes.QwenVLFastRun.INPUT_TYPES()["required"]["model"][0]
    for fam in TINY_FAMILIES:
        assert fam in choices
    assert "Qwen/Qwen2.5-VL-3B-Instruct" in choices and "Qwen/Qwen3-VL-4B-Instruct" in choices
    assert any(c.startswith("Qwen/Qwen3.5") for c in choices)
    assert any("A3B" in c for c in choices)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_image_in_text_out_each_family(nodes, family):
    texts, thinking, timing, ui = run_node(nodes, family, image_batch())
    assert len(texts) == 1 and isinstance(texts[0], str)
    assert ui["text"] == texts
    assert timing["new_tokens"] >= 1
    assert len(timing["images"]) == 1 and timing["images"][0]["tokens"] > 0
    assert timing["family"].lower().replace("-", "").replace(".", "") in family.replace("-", "").replace(".", "")\
        .replace("tiny", "")


def test_batch_of_two_images_is_one_prompt(nodes):
    texts, _, timing, _ = run_node(nodes, "tiny-qwen2.5-vl", image_batch(2))
    assert len(texts) == 1
    assert len(timing["images"]) == 2


def test_one_answer_per_image(nodes):
    texts, thinking, timing, ui = run_node(nodes, "tiny-qwen2.5-vl", image_batch(3),
                                           batch_mode="one answer per image")
    assert len(texts) == 3 and len(thinking) == 3 and len(ui["text"]) == 3
    assert len(timing["images"]) == 3


def test_text_only_prompt(nodes):
    texts, _, timing, _ = run_node(nodes, "tiny-qwen3-vl", None)
    assert len(texts) == 1 and timing["images"] == [] and timing["new_tokens"] >= 1


def test_greedy_is_deterministic_and_seed_controls_sampling(nodes):
    ql = sys.modules[nodes.__name__.replace(".nodes", ".qwenvl_loader")]
    img = image_batch()
    opts = ql.LoadOptions(model="tiny-qwen2.5-vl", allow_absolute_path=False)

    def ids(**kw):
        req = ql.GenerationRequest(prompt="Say something.", images=ql.split_image_batch(img), max_new_tokens=12,
                                   min_new_tokens=12, monitor=False, **kw)
        return ql.run_once(opts, req).token_ids[0]

    assert ids() == ids()
    a = ids(do_sample=True, temperature=1.5, top_k=0, top_p=1.0, seed=7)
    b = ids(do_sample=True, temperature=1.5, top_k=0, top_p=1.0, seed=7)
    c = ids(do_sample=True, temperature=1.5, top_k=0, top_p=1.0, seed=8)
    assert a == b
    assert a != c


def test_switching_model_releases_the_previous_one(nodes):
    ql = sys.modules[nodes.__name__.replace(".nodes", ".qwenvl_loader")]
    run_node(nodes, "tiny-qwen2.5-vl", image_batch())
    first = weakref.ref(ql.MANAGER.current.model)
    run_node(nodes, "tiny-qwen3-vl", image_batch())
    gc.collect()
    assert first() is None, "the previous model's weights are still referenced"
    assert ql.MANAGER.current.options.model == "tiny-qwen3-vl"


def test_reuses_model_while_options_are_the_same(nodes):
    _, _, t1, _ = run_node(nodes, "tiny-qwen2.5-vl", image_batch())
    _, _, t2, _ = run_node(nodes, "tiny-qwen2.5-vl", image_batch(), prompt="Another question.")
    assert t1["model_loaded_this_run"] is True
    assert t2["model_loaded_this_run"] is False
    _, _, t3, _ = run_node(nodes, "tiny-qwen2.5-vl", image_batch(), attention_mode="eager")
    assert t3["model_loaded_this_run"] is True


def test_keep_model_loaded_off_releases_after_run(nodes):
    ql = sys.modules[nodes.__name__.replace(".nodes", ".qwenvl_loader")]
    run_node(nodes, "tiny-qwen2.5-vl", image_batch(), keep_model_loaded=True)
    held = weakref.ref(ql.MANAGER.current.model)
    run_node(nodes, "tiny-qwen2.5-vl", image_batch(), keep_model_loaded=False)
    gc.collect()
    assert ql.MANAGER.current is None
    assert held() is None


def test_missing_model_offline_names_the_folder(nodes, models_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(Exception) as err:
        run_node(nodes, "Qwen/Qwen2.5-VL-3B-Instruct", image_batch())
    msg = str(err.value)
    assert str(models_dir / "Qwen2.5-VL-3B-Instruct") in msg and "HF_HUB_OFFLINE" in msg


def test_missing_local_folder_error(nodes, models_dir):
    with pytest.raises(Exception) as err:
        run_node(nodes, "no-such-model", image_batch())
    assert "no-such-model" in str(err.value) and str(models_dir) in str(err.value)


def test_workflow_cannot_escape_model_folders(nodes, models_dir):
    for bad in (str(models_dir / "tiny-qwen2.5-vl"), "../LLM/tiny-qwen2.5-vl"):
        with pytest.raises(Exception) as err:
            run_node(nodes, bad, image_batch())
        assert "model folders" in str(err.value)


def test_channels_rgba_and_grey_inputs(nodes):
    for c in (1, 3, 4):
        texts, _, timing, _ = run_node(nodes, "tiny-qwen2.5-vl", image_batch(c=c))
        assert timing["images"][0]["size_in"] == [96, 128]


def test_alpha_is_composited_onto_white(nodes):
    ql = sys.modules[nodes.__name__.replace(".nodes", ".qwenvl_loader")]
    rgba = torch.zeros(8, 8, 4)
    rgba[..., 0] = 1.0  # red, fully transparent
    out = ql.canonicalize_image(rgba)
    assert out.dtype == torch.uint8 and torch.all(out == 255)


# ComfyUI calls a node's function with keyword arguments, one per input.
LOAD_INPUTS = dict(model="tiny-qwen2.5-vl", quantization="none", attention_mode="auto", dtype="auto", device="auto",
                   compile_vision="off", keep_model_loaded=True)


def test_load_and_generate_nodes_share_one_model(nodes):
    (handle,) = nodes.QwenVLFastLoadModel().load(**LOAD_INPUTS)
    gen = nodes.QwenVLFastGenerate()
    common = dict(system_prompt="", image_quality="fast", enable_image_cache=True, max_new_tokens=4,
                  do_sample=False, temperature=0.7, top_p=0.9, top_k=50, repetition_penalty=1.0, seed=0,
                  batch_mode="one prompt, all images")
    a = gen.generate(qwenvl_model=handle, prompt="First?", image=image_batch(), **common)
    b = gen.generate(qwenvl_model=handle, prompt="Second?", image=image_batch(), **common)
    ta, tb = json.loads(a["result"][2]), json.loads(b["result"][2])
    assert ta["model_loaded_this_run"] is False and tb["model_loaded_this_run"] is False  # loaded by the loader
    assert tb["images"][0]["cache"] == "memory"


def test_cache_info_node_reports_and_clears(nodes):
    run_node(nodes, "tiny-qwen2.5-vl", image_batch())
    run_node(nodes, "tiny-qwen2.5-vl", image_batch())
    info = json.loads(nodes.QwenVLFastCacheInfo().info(False, False)["result"][0])
    assert info["memory_hits"] >= 1 and info["memory_entries"] >= 1 and info["disk_entries"] >= 1
    cleared = json.loads(nodes.QwenVLFastCacheInfo().info(True, True)["result"][0])
    assert cleared["memory_entries"] == 0 and cleared["disk_entries"] == 0


def test_caption_folder_writes_and_skips(nodes, tmp_path, cut_answers_count_as_complete):
    from PIL import Image

    folder = tmp_path / "pics"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (40 + i * 10, 30), (i * 60, 100, 200)).save(folder / f"img{i}.png")
    (folder / "broken.png").write_bytes(b"not a png")
    (folder / "img0.txt").write_text("already done", encoding="utf-8")
    (handle,) = nodes.QwenVLFastLoadModel().load(**LOAD_INPUTS)
    out = nodes.QwenVLFastCaptionFolder().caption(
        qwenvl_model=handle, folder=str(folder), prompt="Caption.", image_quality="fast", max_new_tokens=4,
        write_txt=True, overwrite=False, seed=0)
    captions, files, report, report_image = out["result"]
    by_name = {p.split("/")[-1]: c for p, c in zip(files, captions)}
    assert by_name["img0.png"] == ""  # skipped: never read (issue 27), so the output holds no caption for it
    assert (folder / "img1.txt").read_text(encoding="utf-8") == by_name["img1.png"]
    assert (folder / "img2.txt").exists()
    assert not (folder / "broken.txt").exists()
    assert any("broken.png: error" in line for line in out["ui"]["text"])
    assert (folder / "img0.txt").read_text(encoding="utf-8") == "already done"
    assert json.loads(report)["files_seen"] == 4 and report_image.shape[0] == 1 and report_image.shape[3] == 3


def test_thinking_block_is_split_out(pack):
    from qwenvl_fast import qwenvl_loader as ql

    assert ql.split_thinking("<think>\nlet me see</think>\n\nA cat.") == ("A cat.", "let me see")
    assert ql.split_thinking("plain answer") == ("plain answer", "")
    assert ql.split_thinking("<think>still thinking") == ("", "still thinking")


def test_importing_the_pack_loads_and_writes_nothing(tmp_path):
    """A fresh interpreter imports the pack: no model, no CUDA context, no files written anywhere."""
    import subprocess

    home = tmp_path / "home"
    home.mkdir()
    code = (
        "import importlib.util, sys, torch\n"
        f"spec = importlib.util.spec_from_file_location('p', r'{ROOT / '__init__.py'}', "
        f"submodule_search_locations=[r'{ROOT}'])\n"
        "m = importlib.util.module_from_spec(spec); sys.modules['p'] = m; spec.loader.exec_module(m)\n"
        "assert len(m.NODE_CLASS_MAPPINGS) == 6, m.NODE_CLASS_MAPPINGS\n"
        "ql = sys.modules['p.qwenvl_loader']\n"
        "assert ql.MANAGER.current is None and ql.MANAGER.load_count == 0\n"
        "assert not torch.cuda.is_initialized()\n"
        "assert not sys.modules['p.embedding_cache']._CACHES\n"
        "print('ok')\n"
    )
    env = {"HOME": str(home), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "XDG_CACHE_HOME": str(home / "xdg")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")
    written = [p for p in home.rglob("*") if p.is_file()]
    assert written == [], f"importing wrote {written}"


def test_progress_per_token_and_partial_text(nodes):
    ql = sys.modules[nodes.__name__.replace(".nodes", ".qwenvl_loader")]
    steps, parts = [], []
    req = ql.GenerationRequest(prompt="Go on.", images=ql.split_image_batch(image_batch()), max_new_tokens=20,
                               min_new_tokens=20, monitor=False, on_progress=lambda s, t: steps.append((s, t)),
                               on_text=parts.append)
    result = ql.run_once(ql.LoadOptions(model="tiny-qwen2.5-vl", allow_absolute_path=False), req)
    assert steps == [(i, 20) for i in range(1, 21)]
    assert len(parts) == 3  # after tokens 8 and 16, then the final text
    assert len(result.token_ids[0]) == 20


def test_symlinked_model_folder_is_usable(nodes, models_dir, tmp_path, monkeypatch):
    """Users keep models on another drive and link them into models/LLM."""
    import os

    llm = tmp_path / "LLM"
    llm.mkdir()
    os.symlink(models_dir / "tiny-qwen2.5-vl", llm / "linked-model")
    monkeypatch.setenv("QWENVL_FAST_MODELS_DIR", str(llm))
    assert "linked-model" in nodes.QwenVLFastRun.INPUT_TYPES()["required"]["model"][0]
    texts, _, timing, _ = run_node(nodes, "linked-model", image_batch())
    assert timing["new_tokens"] >= 1


def test_video_frames_on_the_run_node(nodes):
    """Frames on `video` go through the video path from transformers 5.18 on; before, a clear error names the fix.
    An empty clip is an error before any model is loaded; the node keeps answering afterwards."""
    from qwenvl_fast import qwenvl_loader as ql
    from qwenvl_fast.sources import tf_compat

    with pytest.raises(ql.QwenVLError, match="no frames"):
        run_node(nodes, "tiny-qwen2.5-vl", video=torch.zeros(0, 56, 56, 3))
    frames = image_batch(5, 56, 84, seed=3)
    if tf_compat.transformers_version() < (5, 18):
        with pytest.raises(ql.QwenVLError, match="5.18"):
            run_node(nodes, "tiny-qwen2.5-vl", video=frames)
    else:
        texts, _, timing, _ = run_node(nodes, "tiny-qwen2.5-vl", video=frames, video_fps=10.0, max_frames=4)
        assert len(texts) == 1 and timing["images"] == []
        clip = timing["videos"][0]
        assert (clip["frames"], clip["source_frames"], clip["fps"]) == (4, 5, 10.0)
        one = run_node(nodes, "tiny-qwen2.5-vl", video=frames[:1], max_frames=4)[2]["videos"][0]
        assert one["frames"] == 1 and one["tokens"] == one["tokens_per_frame_pair"]  # one frame: repeated into a pair
    assert len(run_node(nodes, "tiny-qwen2.5-vl", image=image_batch())[0]) == 1
