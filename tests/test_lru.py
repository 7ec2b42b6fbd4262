"""core/lru.py: the one LRU behind the digest memo, the memory tier, the prefix cache and the upload memo."""

from __future__ import annotations

import threading

import pytest

from qwenvl_fast.core.lru import LRU


def test_bytes_bound_evicts_the_least_recently_used():
    lru: LRU[bytes] = LRU(max_bytes=10, sizeof=len)
    assert lru.put("a", b"1234") and lru.put("b", b"1234")
    assert lru.get("a") == b"1234"  # "a" is now the most recent
    assert lru.put("c", b"1234")  # 12 bytes > 10: the oldest ("b") goes
    assert "b" not in lru and lru.get("a") and lru.get("c")
    assert lru.nbytes == 8 and lru.evictions == 1


def test_a_value_over_the_whole_budget_is_refused_and_evicts_nothing():
    lru: LRU[bytes] = LRU(max_bytes=10, sizeof=len)
    lru.put("a", b"12")
    assert lru.put("big", b"x" * 11) is False
    assert "big" not in lru and lru.get("a") == b"12" and lru.evictions == 0


def test_entries_bound_and_replacing_a_key_keeps_the_byte_count_right():
    lru: LRU[bytes] = LRU(max_entries=2, max_bytes=100, sizeof=len)
    lru.put("a", b"1")
    lru.put("a", b"12345")  # replaced, not added
    assert len(lru) == 1 and lru.nbytes == 5
    lru.put("b", b"1")
    lru.put("c", b"1")
    assert "a" not in lru and len(lru) == 2 and lru.nbytes == 2
    assert lru.pop("b") == b"1" and lru.nbytes == 1 and lru.pop("missing") is None
    lru.clear()
    assert len(lru) == 0 and lru.nbytes == 0


def test_a_byte_bound_needs_sizeof():
    with pytest.raises(ValueError, match="sizeof"):
        LRU(max_bytes=10)


def test_threads_never_break_the_bounds():
    lru: LRU[bytes] = LRU(max_bytes=64, max_entries=16, sizeof=len)

    def work(base: int) -> None:
        for i in range(2000):
            lru.put((base, i % 50), b"x" * (i % 9))
            lru.get((base, (i * 7) % 50))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(lru) <= 16 and lru.nbytes <= 64
    assert lru.nbytes == sum(len(v) for v in (lru.get(k) for k in list(lru._items)) if v is not None)
