"""sources/models.py: the family of a config, where a model name points, the model list, folder checks.

Real files throughout: the tiny models written by conftest (config, safetensors, tokenizer, processor) and
config.json files written here by hand with the fields of the published checkpoints that the module reads.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
from transformers import AutoConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

from conftest import TINY_FAMILIES
from qwenvl_fast.core.errors import ModelNotFoundError, QwenVLError
from qwenvl_fast.sources import models
from qwenvl_fast.sources.models import (
    INCOMPLETE_MARKER,
    KNOWN_MODELS,
    FamilyInfo,
    ModelSource,
    add_model_dir,
    check_architecture,
    check_folder,
    default_model_dirs,
    detect_family,
    list_local_models,
    model_choices,
    resolve_model,
    set_host_model_dirs,
)


@pytest.fixture(autouse=True)
def no_registered_dirs(monkeypatch):
    """Each test starts with no model folders registered (the module keeps them process-wide)."""
    monkeypatch.setattr(models, "_EXTRA_MODEL_DIRS", [])
    monkeypatch.setattr(models, "_host_model_dirs", None)
    monkeypatch.delenv("QWENVL_FAST_MODELS_DIR", raising=False)


def _write_config(folder: Path, config: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


# ----------------------------------------------------------------------------------------------------------
# detect_family
# ----------------------------------------------------------------------------------------------------------

TINY_EXPECTED = {
    # model_type, name, patch, merge, temporal patch, deepstack levels (from sources/synthetic.py's presets)
    "tiny-qwen2-vl": ("qwen2_vl", "Qwen2-VL", 14, 2, 2, 0),
    "tiny-qwen2.5-vl": ("qwen2_5_vl", "Qwen2.5-VL", 14, 2, 2, 0),
    "tiny-qwen3-vl": ("qwen3_vl", "Qwen3-VL", 16, 2, 2, 1),
    "tiny-qwen3-vl-moe": ("qwen3_vl_moe", "Qwen3-VL-MoE", 16, 2, 2, 1),
    "tiny-qwen3.5": ("qwen3_5", "Qwen3.5", 16, 2, 2, 0),
}


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_detect_family_of_each_tiny_model(models_dir, family):
    config = AutoConfig.from_pretrained(models_dir / family)
    info = detect_family(config)
    assert info == FamilyInfo(*TINY_EXPECTED[family])
    assert info.factor == info.patch_size * 2
    assert check_architecture(models_dir / family) == TINY_EXPECTED[family][0]


# The vision fields of the published config.json of one checkpoint per family.
REAL_CONFIGS = {
    "Qwen2-VL-7B-Instruct": ({"model_type": "qwen2_vl", "vision_config": {
        "depth": 32, "embed_dim": 1280, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2}},
        ("qwen2_vl", "Qwen2-VL", 14, 2, 2, 0)),
    "Qwen2.5-VL-7B-Instruct": ({"model_type": "qwen2_5_vl", "vision_config": {
        "depth": 32, "hidden_size": 1280, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
        "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31]}},
        ("qwen2_5_vl", "Qwen2.5-VL", 14, 2, 2, 0)),
    "Qwen3-VL-8B-Instruct": ({"model_type": "qwen3_vl", "vision_config": {
        "depth": 27, "hidden_size": 1152, "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2,
        "deepstack_visual_indexes": [8, 16, 24]}},
        ("qwen3_vl", "Qwen3-VL", 16, 2, 2, 3)),
    "Qwen3-VL-30B-A3B-Instruct": ({"model_type": "qwen3_vl_moe", "vision_config": {
        "depth": 27, "hidden_size": 1152, "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2,
        "deepstack_visual_indexes": [8, 16, 24]}},
        ("qwen3_vl_moe", "Qwen3-VL-MoE", 16, 2, 2, 3)),
    "Qwen3.5-9B": ({"model_type": "qwen3_5", "vision_config": {
        "depth": 27, "hidden_size": 1152, "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2}},
        ("qwen3_5", "Qwen3.5", 16, 2, 2, 0)),
    "Qwen3.5-35B-A3B": ({"model_type": "qwen3_5_moe", "vision_config": {
        "depth": 27, "hidden_size": 1152, "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2,
        "deepstack_visual_indexes": []}},
        ("qwen3_5_moe", "Qwen3.5-MoE", 16, 2, 2, 0)),
}


@pytest.mark.parametrize("name", list(REAL_CONFIGS))
def test_detect_family_of_published_configs(tmp_path, name):
    raw, expected = REAL_CONFIGS[name]
    folder = _write_config(tmp_path / name, raw)
    # Before loading: from the raw JSON (what the loader checks before transformers spends time on it).
    assert check_architecture(folder) == expected[0]
    # After: from the transformers config class built from the same file.
    if raw["model_type"] not in CONFIG_MAPPING_NAMES:
        pytest.skip(f"this transformers does not know {raw['model_type']}")
    info = detect_family(AutoConfig.from_pretrained(folder))
    assert info == FamilyInfo(*expected)
    assert info.factor == expected[2] * expected[3]


def test_detect_family_reads_the_vision_config_not_the_name(tmp_path):
    # A made-up Qwen3-VL with other vision numbers: every field comes from the config.
    raw = {"model_type": "qwen3_vl", "vision_config": {"patch_size": 8, "spatial_merge_size": 4,
                                                       "temporal_patch_size": 1, "deepstack_visual_indexes": [1, 2]}}
    folder = _write_config(tmp_path / "Qwen2-VL-looking-name", raw)
    info = detect_family(AutoConfig.from_pretrained(folder))
    assert info == FamilyInfo("qwen3_vl", "Qwen3-VL", 8, 4, 1, 2)
    assert info.factor == 32
    # The raw view's defaults where the file leaves a field out (patch 14, merge 2, temporal 2).
    raw_min = _write_config(tmp_path / "minimal", {"model_type": "qwen2_5_vl"})
    assert check_architecture(raw_min) == "qwen2_5_vl"
    view = models._VisionConfigView({})
    assert (view.patch_size, view.spatial_merge_size, view.temporal_patch_size) == (14, 2, 2)
    # model_type given explicitly wins over the config's own.
    assert detect_family(AutoConfig.from_pretrained(folder), model_type="qwen3_vl_moe").name == "Qwen3-VL-MoE"


@pytest.mark.parametrize("model_type", ["qwen2", "llava", "qwen2_5_omni", None])
def test_unsupported_architectures_are_refused_by_name(tmp_path, model_type):
    raw = {"vision_config": {"patch_size": 14}} if model_type is None else {"model_type": model_type}
    folder = _write_config(tmp_path / "m", raw)
    with pytest.raises(QwenVLError) as err:
        check_architecture(folder)
    message = str(err.value)
    assert message.startswith(f"Unsupported model architecture '{model_type}'.")
    assert "Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE, Qwen3.5, Qwen3.5-MoE" in message
    assert "text-only Qwen or another VLM cannot be used" in message


def test_check_architecture_on_a_broken_config(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "qwen2_vl",', encoding="utf-8")
    with pytest.raises(QwenVLError, match=r"config\.json' is not valid JSON .*download it again"):
        check_architecture(folder)


# ----------------------------------------------------------------------------------------------------------
# resolve_model
# ----------------------------------------------------------------------------------------------------------


def test_a_folder_name_resolves_inside_the_model_folders(models_dir, tmp_path):
    family = TINY_FAMILIES[0]
    empty = tmp_path / "empty"
    empty.mkdir()
    source = resolve_model(f"  {family} ", dirs=[empty, models_dir])  # surrounding spaces are ignored
    assert source == ModelSource("local", family, path=models_dir / family)
    # A repo id whose folder is there resolves to the folder (no download).
    source = resolve_model(f"Qwen/{family}", dirs=[models_dir])
    assert source.kind == "local" and source.path == models_dir / family and source.repo_id is None


def test_a_nested_folder_name_resolves(tmp_path):
    _write_config(tmp_path / "Qwen" / "Qwen2.5-VL-3B-Instruct", {"model_type": "qwen2_5_vl"})
    source = resolve_model("Qwen/Qwen2.5-VL-3B-Instruct", dirs=[tmp_path])
    assert source == ModelSource("local", "Qwen/Qwen2.5-VL-3B-Instruct",
                                 path=tmp_path / "Qwen" / "Qwen2.5-VL-3B-Instruct")


def test_an_absolute_path_is_allowed_only_when_asked(models_dir, tmp_path):
    path = models_dir / TINY_FAMILIES[0]
    assert resolve_model(str(path), dirs=[tmp_path]) == ModelSource("local", str(path), path=path)
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model(str(path), dirs=[tmp_path], allow_absolute=False)
    message = str(err.value)
    assert message.startswith(f"'{path}' is an absolute path; workflows may only name models inside the LLM")
    assert f"({tmp_path})" in message  # the folders that are allowed
    with pytest.raises(ModelNotFoundError, match=r"\(none registered\)"):
        resolve_model(str(path), dirs=[], allow_absolute=False)


def test_an_absolute_path_that_is_not_a_model_folder(tmp_path):
    (tmp_path / "not-a-model").mkdir()
    with pytest.raises(ModelNotFoundError, match=r"not-a-model' is not a model folder \(no config\.json in it\)"):
        resolve_model(str(tmp_path / "not-a-model"), dirs=[])


def test_dot_dot_cannot_leave_the_model_folders(tmp_path):
    base = tmp_path / "LLM"
    base.mkdir()
    _write_config(tmp_path / "outside", {"model_type": "qwen2_vl"})  # a real model folder next to LLM
    for name in ("../outside", "sub/../../outside"):
        with pytest.raises(ModelNotFoundError, match="contains '..'; model names must stay inside"):
            resolve_model(name, dirs=[base], allow_absolute=False)


def test_a_synthetic_name_needs_no_folder():
    assert resolve_model("synthetic:tiny-qwen3-vl", dirs=[]) == ModelSource("synthetic", "synthetic:tiny-qwen3-vl")


def test_an_unknown_repo_id_is_left_to_download(tmp_path):
    assert resolve_model("Qwen/Qwen2-VL-2B-Instruct", dirs=[tmp_path]) == ModelSource(
        "repo", "Qwen/Qwen2-VL-2B-Instruct", repo_id="Qwen/Qwen2-VL-2B-Instruct")


def test_a_missing_name_names_the_folders_searched(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model("no-such-model", dirs=[a, b])
    assert str(err.value).startswith(f"Model 'no-such-model' was not found in {a}, {b}. Put the model's files")
    with pytest.raises(ModelNotFoundError, match="was not found in any model folder"):
        resolve_model("no-such-model", dirs=[])
    with pytest.raises(ModelNotFoundError, match="No model selected"):
        resolve_model("   ", dirs=[a])


def test_a_folder_without_config_is_not_a_model(tmp_path):
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match="half' exists but has no config.json"):
        resolve_model("half", dirs=[tmp_path])


def test_an_interrupted_download_is_reported_with_the_fix(tmp_path):
    folder = _write_config(tmp_path / "Qwen2-VL-2B-Instruct", {"model_type": "qwen2_vl"})
    (folder / INCOMPLETE_MARKER).write_text("download in progress\n")
    expected = f"'{folder}' is an interrupted download (it holds a '.incomplete' marker). Pick the model's repo"
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model("Qwen2-VL-2B-Instruct", dirs=[tmp_path])
    assert str(err.value).startswith(expected)
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model(str(folder), dirs=[tmp_path])
    assert str(err.value).startswith(expected)
    # The repo name, as the message says, resumes the download instead of loading the partial folder.
    assert resolve_model("Qwen/Qwen2-VL-2B-Instruct", dirs=[tmp_path]) == ModelSource(
        "repo", "Qwen/Qwen2-VL-2B-Instruct", repo_id="Qwen/Qwen2-VL-2B-Instruct")
    # Once complete (marker removed), the same names load the folder.
    (folder / INCOMPLETE_MARKER).unlink()
    assert resolve_model("Qwen/Qwen2-VL-2B-Instruct", dirs=[tmp_path]).path == folder


def test_resolve_uses_the_registered_folders_by_default(models_dir, tmp_path):
    family = TINY_FAMILIES[-1]
    with pytest.raises(ModelNotFoundError, match="was not found in any model folder"):
        resolve_model(family)
    add_model_dir(models_dir)
    assert resolve_model(family).path == models_dir / family


# ----------------------------------------------------------------------------------------------------------
# The model list
# ----------------------------------------------------------------------------------------------------------


def test_model_choices_list_local_folders_first_then_the_known_repos(tmp_path):
    base = tmp_path / "LLM"
    _write_config(base / "zeta-model", {"model_type": "qwen2_vl"})
    _write_config(base / "alpha-model", {"model_type": "qwen2_vl"})
    _write_config(base / "Qwen2-VL-2B-Instruct", {"model_type": "qwen2_vl"})  # a known repo, downloaded
    _write_config(base / "Qwen" / "Qwen3-VL-4B-Instruct", {"model_type": "qwen3_vl"})  # a known repo, nested
    (base / "no-config").mkdir()  # not a model
    (base / "stray.json").write_text("{}")
    _write_config(base / "a" / "b" / "c", {"model_type": "qwen2_vl"})  # deeper than two levels: not listed

    assert default_model_dirs() == []
    assert "alpha-model" not in model_choices()
    add_model_dir(base)
    add_model_dir(str(base))  # registered once
    assert default_model_dirs() == [base]

    choices = model_choices()
    local = ["Qwen2-VL-2B-Instruct", "alpha-model", "zeta-model", "Qwen/Qwen3-VL-4B-Instruct"]
    assert choices[:4] == local
    assert choices[4:] == [r for r in KNOWN_MODELS if r not in ("Qwen/Qwen2-VL-2B-Instruct",
                                                                "Qwen/Qwen3-VL-4B-Instruct")]
    assert len(choices) == len(KNOWN_MODELS) + 2
    assert model_choices([tmp_path / "missing"]) == list(KNOWN_MODELS)


def test_model_folders_come_from_the_host_the_environment_and_add_model_dir(tmp_path, monkeypatch):
    host_a, host_b, env, extra = (tmp_path / n for n in ("host_a", "host_b", "env", "extra"))
    for folder, model in ((host_a, "m1"), (host_b, "m2"), (env, "m3"), (extra, "m1")):
        _write_config(folder / model, {"model_type": "qwen2_vl"})
    host = [str(host_a)]
    set_host_model_dirs(lambda: host)  # read at each call
    monkeypatch.setenv("QWENVL_FAST_MODELS_DIR", str(env))
    add_model_dir(extra)
    add_model_dir(host_a)  # also the host's: listed once
    assert default_model_dirs() == [host_a, env, extra]
    host.append(str(host_b))  # e.g. extra_model_paths.yaml, seen without re-registering
    assert default_model_dirs() == [host_a, host_b, env, extra]
    assert list_local_models() == ["m1", "m2", "m3"]  # m1 is in two folders: listed once
    assert resolve_model("m1").path == host_a / "m1"  # the first folder wins
    assert resolve_model("m3").path == env / "m3"


def test_an_interrupted_download_keeps_its_repo_name_choosable(tmp_path):
    folder = _write_config(tmp_path / "Qwen2.5-VL-3B-Instruct", {"model_type": "qwen2_5_vl"})
    (folder / INCOMPLETE_MARKER).write_text("download in progress\n")
    choices = model_choices([tmp_path])
    with pytest.raises(ModelNotFoundError, match="Pick the model's repo name"):
        resolve_model("Qwen2.5-VL-3B-Instruct", dirs=[tmp_path])
    assert "Qwen/Qwen2.5-VL-3B-Instruct" in choices


# ----------------------------------------------------------------------------------------------------------
# check_folder
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture
def model_copy(models_dir, tmp_path):
    """A writable copy of a complete tiny model folder."""
    return Path(shutil.copytree(models_dir / TINY_FAMILIES[0], tmp_path / "model"))


def test_a_complete_model_folder_passes(model_copy):
    assert check_folder(model_copy) is None
    assert models.is_model_folder(model_copy)


def test_check_folder_refuses_an_interrupted_download(model_copy):
    (model_copy / INCOMPLETE_MARKER).write_text("")
    with pytest.raises(ModelNotFoundError, match="is an interrupted download"):
        check_folder(model_copy)
    assert not models.is_model_folder(model_copy)


def test_check_folder_without_config(model_copy):
    (model_copy / "config.json").unlink()
    with pytest.raises(ModelNotFoundError, match="has no config.json: it is not a model folder"):
        check_folder(model_copy)


def test_check_folder_without_weights_and_with_pickle_weights(model_copy):
    (model_copy / "model.safetensors").unlink()
    with pytest.raises(ModelNotFoundError, match=r"has no \*\.safetensors weights"):
        check_folder(model_copy)
    (model_copy / "pytorch_model.bin").write_bytes(b"\x80\x02pickle")
    with pytest.raises(QwenVLError, match=r"holds only pickle weights \(\.bin/\.pt\); .* safetensors only"):
        check_folder(model_copy)


def test_check_folder_on_a_truncated_weight_file(model_copy):
    weights = model_copy / "model.safetensors"
    data = weights.read_bytes()
    header_len = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + header_len])
    expected_size = 8 + header_len + max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
    assert expected_size == len(data)  # the complete file ends where its last tensor ends

    weights.write_bytes(data[:-100])  # cut inside the tensor data
    with pytest.raises(QwenVLError) as err:
        check_folder(model_copy)
    assert str(err.value) == (f"'model.safetensors' is truncated ({len(data) - 100} of {len(data)} bytes): "
                              "download it again.")

    weights.write_bytes(data[:8 + header_len // 2])  # cut inside the header
    with pytest.raises(QwenVLError, match="'model.safetensors' is truncated or corrupt: download it again."):
        check_folder(model_copy)

    weights.write_bytes(data[:5])  # not even the header's length
    with pytest.raises(QwenVLError, match=r"'model.safetensors' is truncated \(incomplete download\)"):
        check_folder(model_copy)

    weights.write_bytes(struct.pack("<Q", 6) + b"{nope}")  # a header that is not JSON
    with pytest.raises(QwenVLError, match="'model.safetensors' cannot be read as safetensors"):
        check_folder(model_copy)


def test_check_folder_on_missing_shards(model_copy):
    shards = [f"model-0000{i}-of-00005.safetensors" for i in range(1, 6)]
    index = {"metadata": {}, "weight_map": {f"w{i}": s for i, s in enumerate(shards)}}
    (model_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelNotFoundError) as err:
        check_folder(model_copy)
    assert str(err.value) == (f"'{model_copy}' is missing weight files ({', '.join(shards[:3])}, ...): "
                              "download them again.")
    for shard in shards[:4]:  # four shards present: copies of the real weight file
        shutil.copy(model_copy / "model.safetensors", model_copy / shard)
    with pytest.raises(ModelNotFoundError, match=rf"missing weight files \({shards[4]}\): download them again"):
        check_folder(model_copy)
    shutil.copy(model_copy / "model.safetensors", model_copy / shards[4])
    assert check_folder(model_copy) is None
    (model_copy / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(QwenVLError, match="'model.safetensors.index.json' cannot be read"):
        check_folder(model_copy)


def test_check_folder_without_processor_or_tokenizer_files(model_copy):
    (model_copy / "processor_config.json").unlink()
    with pytest.raises(ModelNotFoundError, match="is missing preprocessor_config.json: copy the processor"):
        check_folder(model_copy)
    (model_copy / "preprocessor_config.json").write_text("{}")
    check_folder(model_copy)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model_copy / name).unlink()
    with pytest.raises(ModelNotFoundError, match="is missing tokenizer files: copy the processor"):
        check_folder(model_copy)
