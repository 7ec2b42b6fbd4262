"""QWENVL_FAST_* numbers: every one read through core/settings.py, an error naming the variable when it is not one."""

from __future__ import annotations

import pathlib
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qwenvl_fast import embedding_cache as caches
from qwenvl_fast.core.errors import QwenVLError
from qwenvl_fast.core.settings import env_float, env_int, env_mib
from qwenvl_fast.engine import prefix_cache

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("raw", ["abc", "1.5x", "1e999", "nan", "inf", "12 MB"])
def test_a_value_that_is_not_a_number_names_the_variable(monkeypatch, raw):
    monkeypatch.setenv("QWENVL_FAST_TEST_NUMBER", raw)
    with pytest.raises(QwenVLError, match=r"\$QWENVL_FAST_TEST_NUMBER must be a number"):
        env_float("QWENVL_FAST_TEST_NUMBER", 1.0)
    with pytest.raises(QwenVLError, match=r"\$QWENVL_FAST_TEST_NUMBER must be a whole number"):
        env_int("QWENVL_FAST_TEST_NUMBER", 1)


def test_unset_empty_minimum_and_sizes(monkeypatch):
    monkeypatch.delenv("QWENVL_FAST_TEST_NUMBER", raising=False)
    assert env_int("QWENVL_FAST_TEST_NUMBER", 7) == 7 and env_mib("QWENVL_FAST_TEST_NUMBER", 2) == 2 << 20
    monkeypatch.setenv("QWENVL_FAST_TEST_NUMBER", "  ")
    assert env_float("QWENVL_FAST_TEST_NUMBER", 2.5) == 2.5
    monkeypatch.setenv("QWENVL_FAST_TEST_NUMBER", "1.5")
    assert env_mib("QWENVL_FAST_TEST_NUMBER", 9) == 3 << 19
    monkeypatch.setenv("QWENVL_FAST_TEST_NUMBER", "-1")
    with pytest.raises(QwenVLError, match=r"\$QWENVL_FAST_TEST_NUMBER must be at least 0 \(it is -1\)"):
        env_mib("QWENVL_FAST_TEST_NUMBER", 9)


@settings(max_examples=200)
@given(raw=st.text(max_size=12))
def test_any_text_is_a_number_or_an_error_naming_the_variable(monkeypatch, raw):
    monkeypatch.setenv("QWENVL_FAST_TEST_NUMBER", raw.replace("\0", ""))
    name = "QWENVL_FAST_TEST_NUMBER"
    for read in (lambda: env_int(name, 3, 0), lambda: env_float(name, 3.0, 0)):
        try:
            value = read()
        except QwenVLError as exc:
            assert "$QWENVL_FAST_TEST_NUMBER" in str(exc)
        else:
            assert value >= 0


@pytest.mark.parametrize("name", ["QWENVL_FAST_CACHE_MEMORY_MB", "QWENVL_FAST_CACHE_DISK_MB"])
def test_cache_sizes_that_are_not_numbers_are_a_clear_error(monkeypatch, name):
    monkeypatch.setenv(name, "lots")
    caches._CACHES.clear()
    with pytest.raises(QwenVLError, match=re.escape(f"${name} must be a number (it is 'lots')")):
        caches.get_cache(True)
    monkeypatch.setenv(name, "1.5")  # a fraction of a MiB is a size too
    assert caches.get_cache(True) is not None


def test_the_prefix_cache_budget_names_its_variable(monkeypatch):
    monkeypatch.setenv("QWENVL_FAST_PREFIX_CACHE_MB", "a lot")
    with pytest.raises(QwenVLError, match=r"\$QWENVL_FAST_PREFIX_CACHE_MB must be a number"):
        prefix_cache.prefix_cache_bytes()


def test_the_llama_server_numbers_name_their_variable(monkeypatch, tmp_path):
    from qwenvl_fast.backends import llama_server

    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    monkeypatch.setenv("QWENVL_FAST_LLAMA_CONTEXT", "lots")
    with pytest.raises(QwenVLError, match=r"\$QWENVL_FAST_LLAMA_CONTEXT must be a whole number"):
        llama_server.LlamaServerProcess(model, tmp_path / "mmproj-m.gguf", 1, log_dir=tmp_path / "logs")


def test_no_module_parses_a_variable_by_hand():
    """Every int()/float() of an environment variable goes through core/settings.py."""
    pattern = re.compile(r"(int|float)\(\s*os\.(environ|getenv)")
    found = []
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith((".venv", ".ci-work")):
            continue
        if pattern.search(path.read_text(encoding="utf-8", errors="replace")):
            found.append(rel)
    assert not found, found
