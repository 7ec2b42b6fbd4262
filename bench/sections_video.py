"""The 'video' section: encode time of a clip against frames and preset, then the same clip again."""

from __future__ import annotations

import gc
import logging

from bench.bench_base import Bench
from bench.fmt import fmt_time
from bench.inputs import make_clip_frames, parse_size, stamp_clip
from bench.measure import median
from bench.rows import video_rows, video_source_frames
from qwenvl_fast import qwenvl_loader as ql
from qwenvl_fast.core.api import VideoClip
from qwenvl_fast.vision.video import chunk_bounds

log = logging.getLogger("QwenVL-Fast")


class VideoSection(Bench):
    """A clip of random frames through the video path, by frames and preset, then the same clip again."""

    # -- section: video (encode time against frames and preset; a repeated clip) -----------------
    def video_request(self, clip: VideoClip, quality: str, frames: int) -> ql.GenerationRequest:
        """One clip, one new token; memory-tier cache only (``disk_cache=False``): a repeat is a memory hit."""
        return ql.GenerationRequest(prompt="What happens in this video?", videos=[clip], max_frames=int(frames),
                                    image_quality=quality, enable_image_cache=True, disk_cache=False,
                                    max_new_tokens=1, min_new_tokens=1, do_sample=False, seed=0, monitor=True)

    @staticmethod
    def video_parts(rec) -> dict[str, float]:
        """Encode time of a clip = preprocess + transfer + vision tower, as the run record's stages give them."""
        st = rec.stages
        hash_s, pre, tr, enc = (st.get(k, 0.0) for k in ("hash", "preprocess", "transfer", "encode"))
        return dict(hash_s=hash_s, preprocess_s=pre, transfer_s=tr, tower_s=enc, encode_s=pre + tr + enc,
                    embed_s=hash_s + pre + tr + enc)

    def section_video(self) -> None:
        a = self.args
        specs = video_rows(a)
        rid_of = {spec: f"video.{spec[0]}_{spec[1]}f" for spec in specs}
        ids = self.ids(*rid_of.values())
        if not self.budget.allows():
            return self.skip_section(ids, "--time-budget reached")
        if not getattr(self.qm, "use_mm_encoder_outputs", False):
            return self.skip_section(ids, "video needs transformers 5.18 or newer (mm_encoder_outputs)")
        if getattr(self.qm.config, "video_token_id", None) is None:
            return self.skip_section(ids, f"{self.qm.family.name} has no video token")
        w, h = parse_size(a.video_size)
        src = video_source_frames(a)
        base = make_clip_frames(src, w, h, a.seed)
        tps = int(self.qm.family.temporal_patch_size)
        hit_reps = max(1, int(a.hit_repeats))
        # Untimed: the video path's first call (a 2-frame thumbnail clip), so that no row pays for initialisation.
        self.qm.run(self.video_request(VideoClip(make_clip_frames(2, 64, 64, a.seed + 1), 24.0), "fast", 2))
        for r, warm in self.rounds("video", int(a.repeats)):
            order = specs[r % len(specs):] + specs[:r % len(specs)]
            for quality, frames in order:
                k = self.next_k
                self.next_k += 1
                clip = VideoClip(stamp_clip(base, k), 24.0)
                calls = self.qm.vision_calls
                gc.collect()
                with self.clock.time() as t:
                    rec = self.qm.run(self.video_request(clip, quality, frames)).record
                v = rec.videos[0]
                miss_calls = self.qm.vision_calls - calls
                want = len(chunk_bounds(-(-int(v["frames"]) // tps)))
                if v["cache"] != "miss" or miss_calls != want or rec.new_tokens != 1:
                    raise RuntimeError(f"video {quality} x {frames}: cache {v['cache']}, {miss_calls} tower calls "
                                       f"(expected {want}), {rec.new_tokens} new tokens")
                parts = self.video_parts(rec)
                hits: dict[str, list[float]] = {"hit_s": [], "hit_run_s": [], "hit_cpu_s": []}
                calls = self.qm.vision_calls
                for _ in range(hit_reps):
                    gc.collect()  # keep a collector pause out of a millisecond-scale timing
                    with self.clock.time() as th:
                        rec_h = self.qm.run(self.video_request(clip, quality, frames)).record
                    if rec_h.videos[0]["cache"] != "memory" or rec_h.videos[0]["tokens"] != v["tokens"]:
                        raise RuntimeError(f"video {quality} x {frames}: repeat was {rec_h.videos[0]['cache']}")
                    hits["hit_s"].append(self.video_parts(rec_h)["embed_s"])
                    hits["hit_run_s"].append(th["wall"])
                    hits["hit_cpu_s"].append(th["cpu"])
                hit_calls = self.qm.vision_calls - calls
                if hit_calls:
                    raise RuntimeError(f"video {quality} x {frames}: {hit_calls} tower calls on memory hits")
                log.info("[bench] round %d video %s x %d: %d tokens (%d per frame pair), encode %s, hit %s", r,
                         quality, frames, v["tokens"], v["tokens_per_frame_pair"], fmt_time(parts["encode_s"]),
                         fmt_time(median(hits["hit_s"])))
                if warm:
                    continue
                row = self.rows[rid_of[(quality, frames)]]
                self.add(row, **parts, run_s=t["wall"], cpu_s=t["cpu"], frames=v["frames"],
                         source_frames=v["source_frames"], tokens=v["tokens"],
                         tokens_per_frame_pair=v["tokens_per_frame_pair"], budget_tokens=v["budget_tokens"],
                         per_frame_s=parts["encode_s"] / v["frames"], vision_calls=miss_calls,
                         hit_vision_calls=hit_calls, hit_count=hit_reps,
                         **{key: median(vals) for key, vals in hits.items()},
                         encode_over_hit=parts["encode_s"] / max(median(hits["hit_s"]), 1e-9))
                row.info.update(size_in=v["size_in"], size_resized=v["size_resized"], preset=v["preset"],
                                hit_s_all=row.info.get("hit_s_all", []) + [hits["hit_s"]])
        self.finish_rows([i for i, _, _ in ids], "no round finished within --time-budget")
