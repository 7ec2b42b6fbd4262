"""Uploads at the quality preset's size: each image resized to the preset's token budget for the served family's
patch size and encoded as a PNG (or JPEG) data URL, memoised by image digest, size and format."""

from __future__ import annotations

import base64
import io
from typing import Any

import torch

from .. import quality_presets as qp
from ..core.lru import LRU
from ..embedding_cache import get_cache
from ..perf_monitor import RunMonitor
from ..vision.images import canonicalize_image, image_identity

UPLOAD_MEMO_ENTRIES = 256
UPLOAD_MEMO_BYTES = 64 << 20  # `native` uploads of large photos are tens of MiB each: bound the bytes, not entries


class Uploads:
    """Encodes a request's images for one served model (its ``factor``: patch size x merge size)."""

    def __init__(self, upload_format: str, factor: int) -> None:
        self.upload_format = upload_format
        self.factor = factor
        # One upload larger than the whole memo is not kept (LRU.put refuses it): it would push everything out.
        self.memo: LRU[str] = LRU(max_bytes=UPLOAD_MEMO_BYTES, max_entries=UPLOAD_MEMO_ENTRIES, sizeof=len)

    def memo_bytes(self) -> int:
        return self.memo.nbytes

    def clear(self) -> None:
        self.memo.clear()

    def encode(self, canonical: torch.Tensor, size: tuple[int, int] | None) -> str:
        from PIL import Image

        img = Image.fromarray(canonical.numpy())
        if size is not None and (img.height, img.width) != size:
            img = img.resize((size[1], size[0]), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        if self.upload_format == "jpeg":
            img.save(buf, format="JPEG", quality=95)
            mime = "image/jpeg"
        else:
            img.save(buf, format="PNG", compress_level=1)  # level 1: far faster, barely larger
            mime = "image/png"
        return f"data:{mime};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"

    def prepare(self, images: list[torch.Tensor], quality: str, mon: RunMonitor) -> list[dict[str, Any]]:
        """One data URL per image at the preset's size, and what the record shows about it."""
        quality = qp.validate_quality(quality)
        digests = get_cache(False).digests
        factor = self.factor
        out = []
        for image in images:
            with mon.stage("hash"):
                digest, size_in, score, canonical = image_identity(image, digests, want_score=quality == qp.AUTO)
                budget = qp.resolve_budget(quality, factor, None, canonical, score=score)
                size = None if quality == qp.NATIVE else qp.target_size(size_in[0], size_in[1], factor, budget)
            key = (digest, size, self.upload_format)
            url = self.memo.get(key)
            tier = "client-memo"
            if url is None:
                tier = "encoded"
                with mon.stage("preprocess"):
                    canonical = canonical if canonical is not None else canonicalize_image(image)
                    url = self.encode(canonical, size)
                self.memo.put(key, url)
            # `native` leaves the size to the server's own limits: the count shown assumes none bind.
            shown = size or qp.smart_resize(size_in[0], size_in[1], factor, factor ** 2, 1 << 40)
            out.append({"url": url, "record": {
                "size_in": list(size_in), "size_resized": list(shown), "preset": budget.label,
                "tokens": (shown[0] // factor) * (shown[1] // factor),
                "detail_score": budget.detail_score, "cache": tier, "upload_bytes": len(url)}})
        return out
