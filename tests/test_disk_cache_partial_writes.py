"""A disk-cache write that fails midway (a full disk) leaves no entry file outside the index, and files such a
failure left earlier are swept when the cache opens.

The failure is real: a child process writes under a file-size limit (RLIMIT_FSIZE, SIGXFSZ ignored), so the
kernel refuses the write past the limit with EFBIG, as a full disk refuses it with ENOSPC.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from conftest import ROOT
from qwenvl_fast import embedding_cache as ec
from qwenvl_fast.cache import disk_tier

resource = pytest.importorskip("resource")

CHILD = textwrap.dedent("""
    import resource, signal, sys
    sys.path.insert(0, sys.argv[1])
    import pack_path
    pack_path.import_pack()
    import torch
    from qwenvl_fast import embedding_cache as ec

    def item(rows):
        return ec.ImageEmbedding(torch.ones(rows, 16), [], (1, rows // 3, 12))

    tier = ec.DiskTier(sys.argv[2])
    tier.put("small", item(24))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, hard))
    tier.put("big", item(24_000))  # about 1.5 MB: the write stops at 300 KB
    print("available" if tier.available else "disabled", tier.get("small") is not None)
""")


def _entry_files(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.glob("??/??/*.val"))


def test_a_write_that_fails_midway_leaves_no_partial_file(tmp_path):
    folder = tmp_path / "cache"
    proc = subprocess.run([sys.executable, "-c", CHILD, str(ROOT), str(folder)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "disabled" in proc.stdout  # the fault was real, and the tier turned itself off
    files = _entry_files(folder)
    assert len(files) == 1, files  # only the entry that was written whole
    tier = ec.DiskTier(folder)
    assert tier.get("small") is not None and tier.count() == 1
    tier.close()


def test_entry_files_no_index_lists_are_swept_at_open_once_old(tmp_path):
    folder = tmp_path / "cache"
    tier = ec.DiskTier(folder)
    tier.put("kept", ec.ImageEmbedding(torch.ones(24, 16), [], (1, 8, 12)))
    tier.close()
    kept = _entry_files(folder)
    old = folder / "ab" / "cd" / ("0" * 28 + ".val")
    young = folder / "ab" / "cd" / ("1" * 28 + ".val")
    foreign = folder / "ab" / "cd" / "notes.val"  # not diskcache's name: never touched
    old.parent.mkdir(parents=True, exist_ok=True)
    for path in (old, young, foreign):
        path.write_bytes(b"partial")
    stale = time.time() - disk_tier.ORPHAN_AGE_S - 60
    os.utime(old, (stale, stale))
    os.utime(foreign, (stale, stale))
    reopened = ec.DiskTier(folder)
    assert reopened.get("kept") is not None  # opening sweeps; listed entries stay
    files = _entry_files(folder)
    assert old.relative_to(folder).as_posix() not in files
    assert young.exists() and foreign.exists()  # maybe another process's write in flight; not an entry name
    assert set(kept) <= set(files)
    reopened.close()
