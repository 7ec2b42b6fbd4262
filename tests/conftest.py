"""Shared fixtures: tiny real-architecture models written to disk at test time, an isolated cache."""

import os
import pathlib
import sys

import pytest
from hypothesis import HealthCheck, settings

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # for pack_path only: the engine's modules cannot be imported as plain modules
import pack_path  # noqa: E402

pack_path.import_pack()  # the pack as `qwenvl_fast`, as ComfyUI would import it (no ComfyUI here: no nodes act)

from qwenvl_fast.core.settings import env_int  # noqa: E402

# Property-based tests: CI runs the deterministic, bounded "ci" profile (same examples every run, no deadline on a
# shared 2-core machine); `QWENVL_FAST_HYPOTHESIS=long` explores at random, many more examples, by hand
# (`QWENVL_FAST_HYPOTHESIS_EXAMPLES`, default 1000).
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True, database=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.register_profile("long", deadline=None, print_blob=True,
                          max_examples=env_int("QWENVL_FAST_HYPOTHESIS_EXAMPLES", 1000, minimum=1),
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.load_profile(os.environ.get("QWENVL_FAST_HYPOTHESIS", "ci"))

ALL_TINY_FAMILIES = ["tiny-qwen2-vl", "tiny-qwen2.5-vl", "tiny-qwen3-vl", "tiny-qwen3-vl-moe", "tiny-qwen3.5"]


def _supported(names):
    """The families the installed transformers knows (Qwen3.5 arrived in 5.x; CI also runs an older one)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    from qwenvl_fast.sources import synthetic

    return [n for n in names if synthetic.SYNTHETIC_PRESETS[n].family in CONFIG_MAPPING_NAMES]


TINY_FAMILIES = _supported(ALL_TINY_FAMILIES)


def load_tiny(models_dir, family, **options):
    """A tiny test model through the process-wide manager (reused while the options are the same)."""
    from qwenvl_fast import qwenvl_loader as ql

    model, _ = ql.MANAGER.get(ql.LoadOptions(model=str(models_dir / family), **options))
    return model


def tiny_request(images, **overrides):
    """A request that always generates exactly 8 tokens at the `fast` preset (overridable)."""
    from qwenvl_fast import qwenvl_loader as ql

    base = dict(prompt="What is this?", images=images, max_new_tokens=8, min_new_tokens=8, image_quality="fast",
                monitor=False)
    base.update(overrides)
    return ql.GenerationRequest(**base)


def pytest_configure(config):
    for marker, text in [
        ("slow", "slow tests (torch.compile); run in CI"),
        ("comfyui", "tests against a real ComfyUI server"),
    ]:
        config.addinivalue_line("markers", f"{marker}: {text}")


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory):
    """A models/LLM-like folder with one tiny model per family (random weights, real processor)."""
    from qwenvl_fast.sources import synthetic

    base = tmp_path_factory.mktemp("LLM")
    for name in TINY_FAMILIES:
        synthetic.save_synthetic(f"synthetic:{name}", base / name)
    return base


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Each test gets its own disk-cache and caption-ledger folders, a fresh process-wide cache and model manager."""
    monkeypatch.setenv("QWENVL_FAST_CACHE_DIR", str(tmp_path / "cache"))
    # Caption Folder's ledgers: per test, beside (not inside) tmp_path, which tests check for stray files.
    monkeypatch.setenv("QWENVL_FAST_LEDGER_DIR", str(tmp_path.parent / f"{tmp_path.name}-ledgers"))
    from qwenvl_fast import embedding_cache as caches
    from qwenvl_fast import qwenvl_loader as ql

    caches._CACHES.clear()
    yield tmp_path / "cache"
    ql.MANAGER.release()
    for cache in caches._CACHES.values():
        if cache.disk is not None:
            cache.disk.close()
    caches._CACHES.clear()


@pytest.fixture
def cut_answers_count_as_complete(monkeypatch):
    """For tests of something other than how answers end (links, videos, skipping) run on a tiny random model:
    random weights rarely emit a stop token, so their answers are cut at max_new_tokens and Caption Folder refuses
    them (issue 27). This marks each cut answer complete, and records how many it changed, so such a test still
    sees captions written. The endings themselves are tested in tests/test_endings_*.py and test_caption_ledger.py."""
    from qwenvl_fast import qwenvl_loader as ql
    from qwenvl_fast.core.api import COMPLETE, CUT

    real_run_once = ql.run_once
    changed = []

    def run_once(*args, **kwargs):
        result = real_run_once(*args, **kwargs)
        changed.extend(i for i, e in enumerate(result.endings) if e == CUT)
        result.endings = [COMPLETE if e == CUT else e for e in result.endings]
        return result

    monkeypatch.setattr(ql, "run_once", run_once)
    return changed
