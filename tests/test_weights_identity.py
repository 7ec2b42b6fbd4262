"""The cache key's weight identity: what must miss and what must hit (README "The cache key")."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import tiny_request
from qwenvl_fast import embedding_cache as caches
from qwenvl_fast import qwenvl_loader as ql
from qwenvl_fast.sources import synthetic
from qwenvl_fast.sources import weights_identity as wi

FAMILY = "tiny-qwen2.5-vl"


def _prefixes() -> tuple[tuple[str, ...], tuple[str, ...]]:
    # Checkpoints spell the parts "visual." / "model.layers." (transformers 4.x and 5.x's saved format) or
    # "model.visual." / "model.language_model." (5.x's module names): accept either.
    return ("visual.", "model.visual."), ("model.layers.", "model.language_model.")


VISION, LANGUAGE = _prefixes()


@pytest.fixture
def folder(tmp_path, models_dir):
    target = tmp_path / "LLM" / "mine"
    shutil.copytree(models_dir / FAMILY, target)
    return target


def _identity(path):
    model = ql.load_model(ql.LoadOptions(model=str(path)))
    try:
        return model.weights_identity
    finally:
        model.close()


def _edit_weights(path, which: tuple[str, ...]) -> None:
    """Change one tensor whose name starts with ``which`` (a fine-tune of that part, same shapes)."""
    (file,) = sorted(path.glob("*.safetensors"))
    tensors = load_file(file)
    name = next(n for n in sorted(tensors) if n.startswith(which) and tensors[n].is_floating_point())
    tensors[name] = tensors[name] + 0.01
    save_file(tensors, file, metadata={"format": "pt"})


def _image(seed=0):
    return torch.rand(56, 84, 3, generator=torch.Generator().manual_seed(seed))


def _tier(path, image) -> str:
    result = ql.run_once(ql.LoadOptions(model=str(path)), tiny_request([image]))
    return result.record.images[0]["cache"]


def test_same_weights_under_another_name_or_place_hit(folder, tmp_path):
    first = _identity(folder)
    copy = tmp_path / "elsewhere" / "renamed"
    shutil.copytree(folder, copy)
    moved = tmp_path / "moved"
    shutil.move(str(folder), moved)
    assert _identity(copy) == first
    assert _identity(moved) == first


def test_a_fine_tune_in_the_same_folder_misses(folder, tmp_path):
    before = _identity(folder)
    image = _image(1)
    assert _tier(folder, image) == "miss"
    ql.MANAGER.release()
    _edit_weights(folder, VISION)
    assert _identity(folder) != before
    assert _tier(folder, image) == "miss", "a changed vision tower was served the old tower's embedding"


def test_language_model_only_changes_keep_the_embeddings(folder):
    before = _identity(folder)
    image = _image(2)
    assert _tier(folder, image) == "miss"
    ql.MANAGER.release()
    _edit_weights(folder, LANGUAGE)
    assert _identity(folder) == before
    caches._CACHES.clear()  # as after a restart: only the disk tier remains
    assert _tier(folder, image) == "disk"


def test_a_copied_model_hits_the_disk_cache_written_by_the_first(folder, tmp_path):
    image = _image(3)
    assert _tier(folder, image) == "miss"
    ql.MANAGER.release()
    caches._CACHES.clear()
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    assert _tier(copy, image) == "disk"


def test_identity_is_remembered_beside_the_weights_and_rechecked(folder, monkeypatch):
    first = wi.folder_identity(folder, "qwen2_5_vl", _config(folder))
    assert (folder / wi.IDENTITY_FILE).is_file()

    def no_reading(*args, **kwargs):
        raise AssertionError("the weights were read again although nothing changed")

    monkeypatch.setattr(wi, "_hash_vision_tensors", no_reading)
    assert wi.folder_identity(folder, "qwen2_5_vl", _config(folder)) == first
    monkeypatch.undo()
    _edit_weights(folder, VISION)  # new size or modification time: the record no longer applies
    assert wi.folder_identity(folder, "qwen2_5_vl", _config(folder)) != first


def test_a_folder_where_the_record_cannot_be_written_still_gets_an_identity(folder):
    # A directory where the record file belongs: the write fails as in a read-only folder (even for root).
    expected = wi.compute_identity(folder, "qwen2_5_vl", _config(folder))
    (folder / wi.IDENTITY_FILE).unlink(missing_ok=True)  # the copied folder may hold the source's record
    (folder / wi.IDENTITY_FILE).mkdir()
    assert wi.folder_identity(folder, "qwen2_5_vl", _config(folder)) == expected
    assert wi.folder_identity(folder, "qwen2_5_vl", _config(folder)) == expected
    assert not list(folder.glob("*.tmp")), "a temporary record was left behind"


def test_vision_config_changes_the_identity(folder):
    config = _config(folder)
    base = wi.compute_identity(folder, "qwen2_5_vl", config)
    config.vision_config.window_size = config.vision_config.window_size * 2
    assert wi.compute_identity(folder, "qwen2_5_vl", config) != base
    config.vision_config._name_or_path = "/somewhere/else"
    config.vision_config.window_size //= 2
    assert wi.compute_identity(folder, "qwen2_5_vl", config) == base


def test_compiled_and_eager_towers_do_not_share_entries(folder):
    model = ql.load_model(ql.LoadOptions(model=str(folder)))
    try:
        req = tiny_request([_image(4)])
        eager = model._prepare(req.images, req, None, ql.RunMonitor(enabled=False))[0].key

        class Compiled:
            enabled = True

        model.compile_report = Compiled()
        compiled = model._prepare(req.images, req, None, ql.RunMonitor(enabled=False))[0].key
        assert compiled != eager
    finally:
        model.close()


def test_synthetic_identity_follows_the_preset():
    cfg = synthetic.build_config(synthetic.SYNTHETIC_PRESETS[FAMILY], None)
    a = wi.synthetic_identity("synthetic:tiny-qwen2.5-vl", 0, "qwen2_5_vl", cfg)
    assert a == wi.synthetic_identity("synthetic:tiny-qwen2.5-vl", 0, "qwen2_5_vl", cfg)
    assert a != wi.synthetic_identity("synthetic:tiny-qwen2.5-vl", 1, "qwen2_5_vl", cfg)


def _config(path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path)
