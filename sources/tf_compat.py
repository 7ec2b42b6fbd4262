"""What differs between the transformers versions the pack runs on (4.57 to 5.x), in one place.

- 5.18 and newer: ``generate(mm_encoder_outputs={"image": ...})`` takes cached image embeddings.
- Older: the instance's ``get_image_features`` is answered from the cache for one call.
- 4.x reads ``min_pixels``/``max_pixels`` from a processor call; 5.x a ``size`` dict of areas.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from ..embedding_cache import ImageEmbedding


def version_tuple(text: str) -> tuple[int, int]:
    """``"5.24.0"`` -> (5, 24); ``"4.57.1+local"`` -> (4, 57)."""
    parts = []
    for piece in text.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    while len(parts) < 2:
        parts.append(0)
    return parts[0], parts[1]


@lru_cache(maxsize=1)
def transformers_version() -> tuple[int, int]:
    import transformers

    return version_tuple(transformers.__version__)


def supports_mm_encoder_outputs(model: Any) -> bool:
    return "mm_encoder_outputs" in inspect.signature(model.forward).parameters


def takes_mm_token_type_ids(model: Any) -> bool:
    return "mm_token_type_ids" in inspect.signature(model.forward).parameters


def deepstack_output_class(model: Any) -> type | None:
    """The family's output type that carries deepstack features, where the installed version has one."""
    return getattr(inspect.getmodule(type(model.model)), "BaseModelOutputWithDeepstackFeatures", None)


def processor_size_limits(min_pixels: int, max_pixels: int) -> dict[str, Any]:
    """Keyword arguments that bound an image processor call to this pixel range."""
    if transformers_version()[0] < 5:
        return {"min_pixels": min_pixels, "max_pixels": max_pixels}
    return {"size": {"shortest_edge": min_pixels, "longest_edge": max_pixels}}


def vision_outputs(out: Any) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Merged embeddings and deepstack levels from any version's vision tower output."""
    if isinstance(out, torch.Tensor):
        return out, []
    if isinstance(out, tuple) and not hasattr(out, "pooler_output"):
        embeds, deep = out[0], (out[1] if len(out) > 1 else [])
        return embeds, list(deep or [])
    embeds = getattr(out, "pooler_output", None)
    if embeds is None:
        embeds = out.last_hidden_state
    return embeds, list(getattr(out, "deepstack_features", None) or [])


def encoder_outputs(embeddings: list[ImageEmbedding], deepstack_levels: int, deep_cls: type | None) -> Any:
    """The ``mm_encoder_outputs["image"]`` value (transformers >= 5.18) rebuilt from cached embeddings."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    pooled = tuple(e.embeds for e in embeddings)
    if deepstack_levels and deep_cls is not None:
        levels = [tuple(e.deepstack[i] for e in embeddings) for i in range(deepstack_levels)]
        return deep_cls(pooler_output=pooled, deepstack_features=levels)
    return BaseModelOutputWithPooling(pooler_output=pooled)


def legacy_features(embeddings: list[ImageEmbedding], deepstack_levels: int, deep_cls: type | None) -> Any:
    """What ``get_image_features`` returns in transformers < 5.18 (deepstack concatenated, not per image)."""
    pooled = tuple(e.embeds for e in embeddings)
    deep = [torch.cat([e.deepstack[i] for e in embeddings]) for i in range(deepstack_levels)]
    if transformers_version()[0] < 5:
        return (pooled, deep) if deepstack_levels else pooled
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    if deepstack_levels and deep_cls is not None:
        return deep_cls(pooler_output=pooled, deepstack_features=deep)
    return BaseModelOutputWithPooling(pooler_output=pooled)


def install_feature_override(model: Any, features: Any, placeholder_pixels: torch.Tensor,
                             gen_kwargs: dict[str, Any]) -> Callable[[], None]:
    """transformers < 5.18: answer ``get_image_features`` with ``features`` for one generate call.

    The model only asks for image features when ``pixel_values`` is given, so an empty placeholder goes into
    ``gen_kwargs``. Returns the function that restores the model.
    """
    inner = model.model
    had_attr = "get_image_features" in inner.__dict__
    previous = inner.__dict__.get("get_image_features")

    def cached_features(*args: Any, **kwargs: Any) -> Any:
        return features

    inner.get_image_features = cached_features
    gen_kwargs["pixel_values"] = placeholder_pixels

    def restore() -> None:
        if had_attr:
            inner.get_image_features = previous
        else:
            del inner.get_image_features

    return restore
