"""Which vision tower made an embedding: the identity of its weights, for the embedding cache's key.

The identity is a hash of exactly what decides the tower's output for given pixels: the family, the
vision config (minus bookkeeping such as ``_name_or_path``), and every vision tensor's name, dtype,
shape and bytes. Not the folder's name or place, not the repo id, not the transformers version, not
the language model, not a 4-bit or 8-bit load of the language model (the tower is never quantized).

Hashing a tower's weights costs a read of them (about 1.3 GB for Qwen2.5-VL-3B in bf16), so it is done
once per model folder and remembered in a small file beside the weights (``IDENTITY_FILE``), trusted
only while every weight file keeps its size and modification time. A read-only folder recomputes at
each load instead (logged once).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from .models import read_safetensors_header

log = logging.getLogger("QwenVL-Fast")

IDENTITY_FILE = ".qwenvl_fast_vision_identity.json"
IDENTITY_VERSION = 1
_VISION_PREFIXES = ("visual.", "model.visual.", "vision_tower.", "model.vision_tower.")
_CONFIG_BOOKKEEPING = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures",
                       "_attn_implementation_autoset", "_attn_implementation", "attn_implementation"}
_READ_CHUNK = 16 << 20


def _is_vision_tensor(name: str) -> bool:
    return name.startswith(_VISION_PREFIXES)


def _vision_config(config: Any) -> dict[str, Any]:
    vision = getattr(config, "vision_config", None)
    raw = vision.to_dict() if hasattr(vision, "to_dict") else dict(vars(vision)) if vision is not None else {}
    return {k: v for k, v in raw.items() if k not in _CONFIG_BOOKKEEPING}


def _file_stamps(folder: Path) -> dict[str, list[int]]:
    return {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(folder.glob("*.safetensors"))}


def _hash_vision_tensors(folder: Path, h: Any) -> int:
    """Feed every vision tensor (sorted by name, across shards) into ``h``; returns the bytes read."""
    tensors = []
    for file in sorted(folder.glob("*.safetensors")):
        header, data_start = read_safetensors_header(file)
        for name, meta in header.items():
            if name != "__metadata__" and _is_vision_tensor(name):
                begin, end = meta["data_offsets"]
                tensors.append((name, meta["dtype"], tuple(meta["shape"]), file, data_start + begin, end - begin))
    tensors.sort(key=lambda t: t[0])
    total = 0
    handles: dict[Path, Any] = {}
    try:
        for name, dtype, shape, file, offset, length in tensors:
            h.update(f"{name}|{dtype}|{shape}|".encode())
            f = handles.get(file) or handles.setdefault(file, open(file, "rb"))  # noqa: SIM115 (closed below)
            f.seek(offset)
            left = length
            while left > 0:
                chunk = f.read(min(_READ_CHUNK, left))
                if not chunk:
                    raise OSError(f"'{file.name}' ended early (truncated)")
                h.update(chunk)
                left -= len(chunk)
            total += length
    finally:
        for f in handles.values():
            f.close()
    if not tensors:
        raise ValueError("no vision-tower tensors found (names starting with 'visual.')")
    return total


def compute_identity(folder: Path, family: str, config: Any) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(f"v{IDENTITY_VERSION}|{family}|".encode())
    h.update(json.dumps(_vision_config(config), sort_keys=True, default=str).encode())
    _hash_vision_tensors(folder, h)
    return h.hexdigest()


def folder_identity(folder: Path, family: str, config: Any) -> str:
    """The vision tower's identity for a model folder, from the remembered file while it is still true."""
    folder = Path(folder)
    stamps = _file_stamps(folder)
    record_path = folder / IDENTITY_FILE
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
        if (record.get("version") == IDENTITY_VERSION and record.get("files") == stamps
                and record.get("family") == family and isinstance(record.get("identity"), str)):
            return record["identity"]
    except (OSError, ValueError, AttributeError):
        pass
    identity = compute_identity(folder, family, config)
    record = {"version": IDENTITY_VERSION, "family": family, "files": stamps, "identity": identity}
    tmp = record_path.with_name(f"{IDENTITY_FILE}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(record, indent=1), encoding="utf-8")
        os.replace(tmp, record_path)
    except OSError as exc:
        log.info("[QwenVL-Fast] cannot remember the vision weights' identity in %s (%s); it is recomputed at "
                 "each load", folder, exc)
        tmp.unlink(missing_ok=True)
    return identity


def synthetic_identity(name: str, seed: int, family: str, config: Any) -> str:
    """A synthetic model's weights follow from its preset and seed."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"v{IDENTITY_VERSION}|synthetic|{name}|{seed}|{family}|".encode())
    h.update(json.dumps(_vision_config(config), sort_keys=True, default=str).encode())
    return h.hexdigest()
