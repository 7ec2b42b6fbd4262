"""From the user's words to token ids, and from generated ids back to an answer.

The chat template places one slot per image and per video; each slot becomes as many pad tokens as the image
or clip costs, computed from its grid, so the processor never has to see the pixels (a cache hit needs none).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

from ..core.errors import QwenVLError

if TYPE_CHECKING:
    from ..vision.images import PreparedImage
    from ..vision.video import PreparedVideo

log = logging.getLogger("QwenVL-Fast")

THINK_START = "<think>"
THINK_END = "</think>"
_CONTROL_TOKENS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|im_start|>",
                   "<|im_end|>", "<|endoftext|>")


def split_thinking(raw: str, opened: bool = False) -> tuple[str, str]:
    """(answer, reasoning). Thinking models open with <think> (often in the template: ``opened``, then the answer
    holds no <think> of its own) and close with </think>."""
    if THINK_END in raw:
        reasoning, _, answer = raw.partition(THINK_END)
        return answer.strip(), reasoning.replace(THINK_START, "").strip()
    if reasoning_open(raw, opened):
        # Cut off while still reasoning: there is no answer yet.
        return "", raw.replace(THINK_START, "").strip()
    return raw.strip(), ""


def reasoning_open(raw: str, opened: bool = False) -> bool:
    """Whether an answer ended inside its reasoning: <think> opened (by the template, ``opened``, or by the answer
    itself) and never closed."""
    return (opened or raw.lstrip().startswith(THINK_START)) and THINK_END not in raw


class PromptBuilder:
    """The chat template, the image slots and the special tokens of one loaded model."""

    def __init__(self, processor: Any, image_token_id: int, merge_size: int, with_mm_token_type_ids: bool,
                 video_token_id: int | None = None, video_timestamps: bool = False,
                 with_second_per_grid_ts: bool = False) -> None:
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_token = getattr(processor, "image_token", "<|image_pad|>")
        self.image_token_id = int(image_token_id)
        self.video_token = getattr(processor, "video_token", "<|video_pad|>")
        self.video_token_id = int(video_token_id) if video_token_id is not None else None
        self.vision_start = getattr(processor, "vision_start_token", "<|vision_start|>")
        self.vision_end = getattr(processor, "vision_end_token", "<|vision_end|>")
        # Qwen3-VL and Qwen3.5 write each temporal patch as "<t seconds><|vision_start|>pads<|vision_end|>";
        # Qwen2/2.5-VL one run of pads, with the time in second_per_grid_ts (rotary positions).
        self.video_timestamps = video_timestamps
        self.with_second_per_grid_ts = with_second_per_grid_ts
        self.merge_size = merge_size
        self.with_mm_token_type_ids = with_mm_token_type_ids
        self._reserved = [t for t in (*_CONTROL_TOKENS, self.image_token) if t]
        # Whether the last prompt built ends inside an open <think> (a thinking model's template opens it): the
        # answer then starts in its reasoning.
        self.opens_thinking = False

    def clean_user_text(self, text: str) -> str:
        """The user's text without chat-template control tokens (they would forge turns or image slots)."""
        cleaned, previous = text, None
        while cleaned != previous:  # until stable: removing one token must not join the pieces of another
            previous = cleaned
            for tok in self._reserved:
                cleaned = cleaned.replace(tok, "")
        if cleaned != text:
            log.warning("[QwenVL-Fast] removed chat-template control tokens from the prompt text")
        return cleaned

    def video_placeholder(self, video: PreparedVideo, whole_slot: bool = True) -> str:
        """The text that stands for one clip (what the model's processor writes for it).

        ``whole_slot``: it replaces the template's ``<|vision_start|><|video_pad|><|vision_end|>``, not only the pad.
        """
        per_patch = video.grid[1] * video.grid[2] // self.merge_size ** 2
        if not self.video_timestamps:
            pads = self.video_token * (per_patch * video.grid[0])
            return self.vision_start + pads + self.vision_end if whole_slot else pads
        return "".join(f"<{t:.1f} seconds>" + self.vision_start + self.video_token * per_patch + self.vision_end
                       for t in video.times[:video.grid[0]])

    def build_inputs(self, prompt: str, system_prompt: str, images: list[PreparedImage],
                     videos: list[PreparedVideo] | None = None) -> dict[str, torch.Tensor]:
        videos = videos or []
        content: list[dict[str, Any]] = [{"type": "image"} for _ in images]
        content += [{"type": "video"} for _ in videos]
        content.append({"type": "text", "text": self.clean_user_text(prompt)})
        messages: list[dict[str, Any]] = []
        if system_prompt.strip():
            messages.append({"role": "system", "content": [{"type": "text",
                                                             "text": self.clean_user_text(system_prompt)}]})
        messages.append({"role": "user", "content": content})
        text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        turn = text.rpartition("<|im_start|>")[2]  # the assistant's turn the template opened
        self.opens_thinking = turn.rfind(THINK_START) > turn.rfind(THINK_END)
        merge2 = self.merge_size ** 2
        pieces = text.split(self.image_token)
        if len(pieces) - 1 != len(images):
            raise QwenVLError(f"The chat template produced {len(pieces) - 1} image slots for {len(images)} images.")
        out = pieces[0]
        for img, piece in zip(images, pieces[1:]):
            out += self.image_token * (img.tokens // merge2) + piece
        if videos:
            out = self._place_videos(out, videos)
        enc = self.tokenizer(out, return_tensors="pt", add_special_tokens=False)
        ids = enc["input_ids"]
        inputs = {"input_ids": ids, "attention_mask": enc["attention_mask"]}
        if self.with_mm_token_type_ids:
            types = (ids == self.image_token_id).to(torch.int32)
            if videos and self.video_token_id is not None:
                types[ids == self.video_token_id] = 2  # text 0, image 1, video 2
            inputs["mm_token_type_ids"] = types
        if images:
            inputs["image_grid_thw"] = torch.tensor([img.grid for img in images], dtype=torch.long)
        if videos:
            inputs["video_grid_thw"] = torch.tensor([v.grid for v in videos], dtype=torch.long)
            if self.with_second_per_grid_ts:
                inputs["second_per_grid_ts"] = torch.tensor([v.second_per_grid for v in videos], dtype=torch.float32)
        return inputs

    def _place_videos(self, text: str, videos: list[PreparedVideo]) -> str:
        """Each video slot of the templated text replaced by its clip's placeholder.

        The templates write a video slot as ``<|vision_start|><|video_pad|><|vision_end|>``; the slot as a whole
        is replaced (Qwen's own processors do this; a per-patch span inside it would nest vision markers).
        """
        wrapped = self.vision_start + self.video_token + self.vision_end
        slot = wrapped if text.count(wrapped) == len(videos) else self.video_token
        pieces = text.split(slot)
        if len(pieces) - 1 != len(videos):
            raise QwenVLError(f"The chat template produced {len(pieces) - 1} video slots for {len(videos)} videos.")
        out = pieces[0]
        for video, piece in zip(videos, pieces[1:]):
            out += self.video_placeholder(video, whole_slot=slot == wrapped) + piece
        return out

    def decode_answer(self, new_ids: torch.Tensor) -> str:
        """Generated ids to text, special tokens removed except the thinking markers (split_thinking needs them)."""
        raw = self.tokenizer.decode(new_ids, skip_special_tokens=False)
        for tok in self.tokenizer.all_special_tokens:
            if tok not in (THINK_START, THINK_END):
                raw = raw.replace(tok, "")
        return raw

    def decode_partial(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)
