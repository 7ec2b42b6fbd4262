"""One embedding-cache entry as bytes: raw safetensors with its key, format, grid, merge size and a checksum.

Nothing is ever pickled or unpickled. Every entry is checked on read: a checksum of its tensor data and header
bound to its own key, then key, format, shapes, rows against grid and merge size; anything that is not exactly
ours raises ValueError (the disk tier drops it and the embedding is recomputed).
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any

import torch

# 2: entries carry a checksum (``CHECKSUM_FIELD``). The version is part of every key, so version-1 entries are
# never looked up again; they age out of the LRU.
CACHE_FORMAT_VERSION = 2


@dataclass
class ImageEmbedding:
    """One image's vision-tower output: merged embeddings, deepstack levels and its grid."""

    embeds: torch.Tensor  # [tokens, out_hidden]
    deepstack: list[torch.Tensor] = field(default_factory=list)  # each [tokens, out_hidden]
    grid: tuple[int, int, int] = (1, 1, 1)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [self.embeds, *self.deepstack])

    def to(self, device: torch.device | str) -> ImageEmbedding:
        return ImageEmbedding(
            self.embeds.to(device, non_blocking=True),
            [t.to(device, non_blocking=True) for t in self.deepstack],
            self.grid,
        )



def merge_size_of(rows: int, grid: tuple[int, ...]) -> int:
    """The spatial merge size that makes ``rows * merge**2 == t*h*w``; ValueError when none does."""
    if len(grid) != 3 or any(int(v) <= 0 for v in grid) or rows <= 0:
        raise ValueError(f"bad grid {tuple(grid)} or row count {rows}")
    cells = math.prod(int(v) for v in grid)
    merge = math.isqrt(cells // rows) if cells % rows == 0 else 0
    if merge <= 0 or rows * merge * merge != cells:
        raise ValueError(f"{rows} rows do not fit grid {tuple(grid)} for any merge size")
    return merge


CHECKSUM_FIELD = "checksum"  # in the safetensors metadata: "<algorithm>:<hex digest>"
_CHECKSUM_DOMAIN = b"qwenvl-fast embedding entry\0"


def _new_checksum(algorithm: str) -> Any:
    """An incremental hasher for an entry checksum; ValueError for an algorithm this install cannot compute."""
    if algorithm == "xxh3_128":
        try:
            import xxhash
        except ImportError as exc:
            raise ValueError("entry checksum is xxh3_128 and xxhash is not installed") from exc
        return xxhash.xxh3_128()  # unseeded: the value must be the same in every process
    if algorithm == "blake2b_128":
        return hashlib.blake2b(digest_size=16)
    raise ValueError(f"unknown entry checksum {algorithm!r}")


def _checksum_algorithm() -> str:
    """xxh3_128 when xxhash is installed (memory speed: a 16 MiB entry in about 1 ms), else blake2b_128.

    The checksum guards against damage (a flipped bit, a torn write, another key's bytes), not against an
    attacker who can write the cache folder: such a person can write any entry with a valid checksum anyway.
    """
    try:
        import xxhash  # noqa: F401
    except ImportError:
        return "blake2b_128"
    return "xxh3_128"


def _split_entry(blob: bytes | memoryview) -> tuple[dict, memoryview]:
    """A safetensors blob's parsed header and its data section (no copy); ValueError when truncated."""
    if len(blob) < 8:
        raise ValueError("truncated entry")
    (header_len,) = struct.unpack("<Q", bytes(blob[:8]))
    if header_len <= 0 or 8 + header_len > len(blob):
        raise ValueError("truncated header")
    try:
        header = json.loads(bytes(blob[8:8 + header_len]))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"unreadable header ({exc})") from exc
    if not isinstance(header, dict):
        raise ValueError("unreadable header (not an object)")
    return header, memoryview(blob)[8 + header_len:]


def entry_checksum(key: str, header: dict, data: bytes | memoryview, algorithm: str) -> str:
    """``"<algorithm>:<hex>"`` over the key, the header (without its checksum) and the tensor data.

    Binding the key means another key's intact entry, moved under this key, fails the check; hashing the
    header too means a changed shape, dtype, offset, grid or merge size fails it, not only a changed value.
    The header is hashed in a canonical form (sorted keys, no spaces), so its padding does not matter.
    """
    meta = dict(header.get("__metadata__") or {})
    meta.pop(CHECKSUM_FIELD, None)
    canonical = json.dumps({**header, "__metadata__": meta}, sort_keys=True, separators=(",", ":"))
    h = _new_checksum(algorithm)
    for part in (_CHECKSUM_DOMAIN, key.encode(), b"\0", canonical.encode(), b"\0", data):
        h.update(part)
    return f"{algorithm}:{h.hexdigest()}"


def serialize_embedding(key: str, item: ImageEmbedding) -> bytes:
    """Raw safetensors bytes with the key, format, grid, merge size and checksum; ValueError if rows and grid
    disagree."""
    from safetensors.torch import save

    if item.embeds.dim() != 2:
        raise ValueError("embeds must be [tokens, hidden]")

    tensors = {"embeds": item.embeds.detach().contiguous().cpu()}
    for i, level in enumerate(item.deepstack):
        tensors[f"deepstack.{i}"] = level.detach().contiguous().cpu()
    meta = {
        "key": key,
        "format": str(CACHE_FORMAT_VERSION),
        "grid": json.dumps(list(item.grid)),
        "merge": str(merge_size_of(int(item.embeds.shape[0]), tuple(item.grid))),
        "deepstack_levels": str(len(item.deepstack)),
    }
    # Saved twice: the checksum covers the header that safetensors writes (offsets, dtypes, shapes), which
    # only exists once saved. A put happens after a vision-tower run, so the second copy is noise.
    header, data = _split_entry(save(tensors, metadata=meta))
    meta[CHECKSUM_FIELD] = entry_checksum(key, header, data, _checksum_algorithm())
    return save(tensors, metadata=meta)


def deserialize_embedding(key: str, blob: bytes, require_checksum: bool = False) -> ImageEmbedding:
    """Parse and check an entry; raises ValueError for anything that is not exactly ours.

    A checksum, when the entry has one, must match. ``require_checksum`` (the disk tier's reads) also refuses
    an entry without one; entries forged in tests and hand-made tools can leave it out.
    """
    from safetensors.torch import load

    header, data = _split_entry(blob)
    meta = header.get("__metadata__") or {}
    if meta.get("key") != key or meta.get("format") != str(CACHE_FORMAT_VERSION):
        raise ValueError("foreign entry (key or format mismatch)")
    stored = meta.get(CHECKSUM_FIELD)
    if stored is None:
        if require_checksum:
            raise ValueError("entry has no checksum")
    elif not isinstance(stored, str) or ":" not in stored:
        raise ValueError("malformed checksum")
    elif entry_checksum(key, header, data, stored.split(":", 1)[0]) != stored:
        raise ValueError("checksum mismatch (the entry's bytes changed after it was written)")
    tensors = load(blob)
    grid = tuple(int(v) for v in json.loads(meta["grid"]))
    levels = int(meta["deepstack_levels"])
    embeds = tensors["embeds"]
    deepstack = [tensors[f"deepstack.{i}"] for i in range(levels)]
    if len(grid) != 3 or embeds.dim() != 2 or any(d.shape != embeds.shape for d in deepstack):
        raise ValueError("inconsistent shapes")
    rows = int(embeds.shape[0])
    if "merge" in meta:
        merge = int(meta["merge"])
        if merge <= 0 or min(grid) <= 0 or rows * merge * merge != math.prod(grid):
            raise ValueError(f"{rows} rows do not match grid {grid} with merge size {merge}")
    else:  # written before the merge size was stored: some integer merge size must fit
        merge_size_of(rows, grid)
    return ImageEmbedding(embeds, deepstack, grid)  # type: ignore[arg-type]
