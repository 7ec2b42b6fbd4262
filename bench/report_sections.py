"""The tables of the 'answers' and 'video' sections."""

from __future__ import annotations

import argparse
from typing import Any

from bench.fmt import View, cell, fmt_bytes, fmt_ratio, fmt_time, row_map, spread, status_note
from bench.inputs import parse_size
from bench.measure import Row, ratio_basis
from bench.rows import answer_row_labels, video_row_labels, video_rows, video_source_frames


def answers_markdown(entry: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """The 'answers' section: prefix reuse, N answers batched vs one by one, decode vs floor, folder captioning."""
    v = View(entry, args)
    basis = "CPU time" if v.on_cpu else "wall time"
    rows = [v.g(rid) for rid in answer_row_labels(args)]
    rounds = max([int(r.info.get("rounds", 0)) for r in rows if r is not None] or [0])
    out = ["", "### Answers: prefix reuse, one answer per image batched, decode, folder captioning", "",
           f"Each pair alternates within every round (order rotated); a speedup is computed inside each round from "
           f"{basis} and shown as the median over rounds with its spread (min-max, {rounds} round(s)). "
           f"compile_decode of the loaded model: `{entry.get('compile_decode', 'n/a')}`.", ""]
    return out + prefix_tables(v) + each_tables(v) + decode_tables(v) + folder_tables(v)


def prefix_tables(v: View) -> list[str]:
    """A new question on a seen image: prefix KV reused or prefilled again."""
    g, cpu, cpu_head, cpu_rule, entry, args = v.g, v.cpu, v.cpu_head, v.cpu_rule, v.entry, v.args
    size, n = args.image_size, args.new_tokens
    a, b = g("answers.prefix_reuse"), g("answers.prefix_no_reuse")
    out = [f"#### New question on a seen image ({size}x{size}, `balanced`, exactly {n} new tokens)", "",
            f"| Configuration | Total |{cpu_head} Prefill | Decode | Prompt tokens | Prefix tokens reused / "
            f"prefilled | Speedup end to end |",
            f"|---|---|{cpu_rule}---|---|---|---|---|"]
    for r, sp in ((a, spread(a, "speedup_vs_no_reuse")), (b, "1.00x" if b is not None and b.status == "ok" else "-")):
        out.append(f"| {r.label if r else '-'} | {cell(r, 'time_s')} |{cpu(r)} {cell(r, 'prefill_s')} | "
                   f"{cell(r, 'decode_s')} | {cell(r, 'prompt_tokens', 'int')} | "
                   f"{cell(r, 'prefix_tokens_reused', 'int')} / {cell(r, 'prefix_tokens_prefilled', 'int')} | {sp} |")
    if a is not None and a.status == "ok" and b is not None and b.status == "ok":
        am, bm, info = a.metrics, b.metrics, a.info
        per = am["decode_per_token_s"]
        out += ["", f"Prefill alone (wall time of the stage): {spread(a, 'prefill_speedup')}; end to end in wall "
                f"time: {spread(a, 'wall_speedup_vs_no_reuse')}."]
        if am["time_s"] > am["prefill_s"]:
            out.append(f"With (a) the prefix costs nothing more, so end to end is bounded by the rest: decode "
                       f"{fmt_time(am['decode_s'])} of (a)'s {fmt_time(am['time_s'])} total. Even a prefill of zero "
                       f"would make (b)/(a) at most {fmt_ratio(bm['time_s'] / (am['time_s'] - am['prefill_s']))} "
                       "(wall).")
        wb, hb, head_s = info.get("weight_bytes_per_token"), info.get("lm_head_bytes"), info.get("lm_head_one_token_s")
        if wb and hb and head_s:
            out.append(f"Decode takes {fmt_time(per)} per token (the {n - 1} after the first). Each step reads the "
                       f"language model's weights, {fmt_bytes(wb)} ({entry.get('dtype', '?')}), of which "
                       f"{fmt_bytes(hb)} ({hb / wb * 100:.0f}%) are the {info.get('vocab', '?')}-entry lm_head; that "
                       f"lm_head alone on one token takes {fmt_time(head_s)} here ({hb / head_s / 1e9:.1f} GB/s), "
                       f"{head_s / per * 100:.0f}% of a decode step. The whole step streams the weights at "
                       f"{wb / per / 1e9:.1f} GB/s.")
    out.append("")
    out += status_note([a, b])

    return out


def each_tables(v: View) -> list[str]:
    """N images, one answer each: batched against one by one."""
    g, args, cpu, cpu_head, cpu_rule = v.g, v.args, v.cpu, v.cpu_head, v.cpu_rule
    t = args.answers_new_tokens
    k = args.answers_images
    e1, e2 = g("answers.each_one_by_one"), g("answers.each_batched")
    out = ["", f"#### {k} images, one answer each ({args.answers_image_size}x{args.answers_image_size}, "
            f"`{args.answers_quality}`, exactly {t} new tokens, embeddings cached)", "",
            f"| Configuration | Total |{cpu_head} Per answer | Answers/s | generate calls | Speedup |",
            f"|---|---|{cpu_rule}---|---|---|---|"]
    for r in (e1, e2):
        sp = "1.00x" if r is e1 and r is not None and r.status == "ok" else spread(r, "speedup_vs_one_by_one")
        rate = "-" if r is None or r.m("captions_per_s") is None else f"{r.metrics['captions_per_s']:.2f}"
        out.append(f"| {r.label if r else '-'} | {cell(r, 'time_s')} |{cpu(r)} {cell(r, 'per_caption_s')} | "
                   f"{rate} | {cell(r, 'generate_calls', 'int')} | {sp} |")
    out.append("")
    out += status_note([e1, e2])

    return out


def decode_tables(v: View) -> list[str]:
    """Decode per token against the weight-bandwidth floor."""
    g, args = v.g, v.args
    t = args.answers_new_tokens
    d1, d2 = g("answers.decode_eager"), g("answers.decode_auto")
    out = ["", f"#### Decode per token against the weight-bandwidth floor (one image, exactly {t} new tokens)", "",
            "| Configuration | Decode per token | Tokens/s | Floor | x floor | Speedup vs eager |",
            "|---|---|---|---|---|---|"]
    eager_one = "1.00x" if d1 is not None and d1.status == "ok" else "-"
    for r in (d1, d2):
        floor = r.info.get("floor_s") if r is not None and r.status == "ok" else None
        tps = "-" if r is None or r.m("tokens_per_s") is None else f"{r.metrics['tokens_per_s']:.1f}"
        xf = "-" if r is None or r.m("over_floor") is None else f"{r.metrics['over_floor']:.2f}x"
        out.append(f"| {r.label if r else '-'} | {spread(r, 'decode_per_token_s', 'time')} | {tps} | "
                   f"{fmt_time(floor)} | {xf} | {spread(r, 'speedup_vs_eager') if r is d2 else eager_one} |")
    if d1 is not None and d1.status == "ok":
        i = d1.info
        bw = i.get("bandwidth_bytes_per_s")
        out += ["", f"Floor = {fmt_bytes(i.get('weight_bytes_per_token'))} of language-model weights read per token "
                f"/ {'-' if not bw else f'{bw / 1e12:.2f} TB/s'} peak memory bandwidth (device properties)."]
    out.append("")
    out += status_note([d1, d2])

    return out


def folder_tables(v: View) -> list[str]:
    """Caption Folder end to end: batched against one by one."""
    g, args, cpu, cpu_head, cpu_rule = v.g, v.args, v.cpu, v.cpu_head, v.cpu_rule
    t = args.answers_new_tokens
    f1, f2 = g("answers.folder_one_by_one"), g("answers.folder_batched")
    out = ["", f"#### Caption Folder, {args.folder_images} image files end to end (files read, hashed, "
            f"{'encoded' if args.folder_cache == 'cold' else 'embeddings from the memory cache'}, answered, "
            f".txt written; `{args.answers_quality}`, exactly {t} new tokens)", "",
            f"| Configuration | Total |{cpu_head} Captions/s | Speedup |", f"|---|---|{cpu_rule}---|---|"]
    for r in (f1, f2):
        sp = "1.00x" if r is f1 and r is not None and r.status == "ok" else spread(r, "speedup_vs_one_by_one")
        rate = "-" if r is None or r.m("captions_per_s") is None else f"{r.metrics['captions_per_s']:.2f}"
        out.append(f"| {r.label if r else '-'} | {cell(r, 'time_s')} |{cpu(r)} {rate} | {sp} |")
    if f2 is not None and f2.status == "ok" and "first_pass_s" in f2.info:
        i = f2.info
        out += ["", f"First pass (every image a miss, batched; the warm-up, not paired): "
                f"{fmt_time(i['first_pass_s'])}, {args.folder_images / i['first_pass_s']:.2f} captions/s, "
                f"{i['first_pass_vision_calls']} vision-tower calls."]
    out.append("")
    out += status_note([f1, f2])
    return out


def video_markdown(entry: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """The 'video' section: encode time of a clip against frames and preset, and the repeated clip."""
    g = row_map(entry).get
    on_cpu = ratio_basis(entry.get("device") or "cpu") == "cpu_s"
    w, h = parse_size(args.video_size)
    src = video_source_frames(args)
    rows = [g(rid) for rid in video_row_labels(args)]
    rounds = max([int(r.info.get("rounds", 0)) for r in rows if r is not None] or [0])
    cpu_head, cpu_rule = (" CPU time (whole miss call) |", "---|") if on_cpu else ("", "")
    out = ["", f"### Video: encode time against frames and preset (a clip of {src} random {w}x{h} frames, a "
           "float32 IMAGE batch; exactly 1 new token)", "",
           "Each row samples its frames evenly from a new clip (every frame a new cache key): the cache miss's "
           "encode time is preprocess + transfer + vision tower as the run record's stages give them (the tower "
           "runs four frame pairs per call); then the same clip again, a memory-tier hit (digest memo + lookup, no "
           f"tower call), {args.hit_repeats} time(s) per round. Median over rounds with the min-max "
           f"({rounds} round(s)); rows rotate their order from round to round.", "",
           f"| Preset | Frames | Frame size | Visual tokens | Tokens per frame pair | Encode (miss) | Per frame |"
           f"{cpu_head} Tower calls | Repeat (memory hit) |",
           f"|---|---|---|---|---|---|---|{cpu_rule}---|---|"]
    for (q, f), r in zip(video_rows(args), rows):
        size = "-"
        if r is not None and r.status == "ok" and r.info.get("size_resized"):
            rh, rw = r.info["size_resized"]
            size = f"{rw}x{rh}"
        cpu = f" {cell(r, 'cpu_s')} |" if on_cpu else ""
        out.append(f"| `{q}` | {f} | {size} | {cell(r, 'tokens', 'int')} | {cell(r, 'tokens_per_frame_pair', 'int')} "
                   f"| {spread(r, 'encode_s', 'time')} | {cell(r, 'per_frame_s')} |{cpu} "
                   f"{cell(r, 'vision_calls', 'int')} | {spread(r, 'hit_s', 'time')} |")
    out += ["", "Per frame = encode / frames sampled. The repeat's time is the embedding part of the call (hash "
            "stage: digest memo and cache lookup); the whole repeated call, with the prompt and a 1-token prefill, "
            "is `hit_run_s` in the JSON.", ""]
    out += status_note(rows)
    return out


def exactness(info: dict[str, Any], key: str = "max_abs_diff") -> str:
    """``bit-exact`` or the max |difference| of pixel_values (normalised units)."""
    v = info.get(key)
    if v is None:
        return "-"
    return "bit-exact" if v == 0 else f"max abs diff {v:.2g}"


def preprocess_markdown(section: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """The 'preprocess' section: ours against transformers' image processor, same device, same images."""
    rows: list[Row] = section["rows"]
    device = section.get("device", "?")
    on_cpu = ratio_basis(device) == "cpu_s"
    accel = not on_cpu
    rounds = max([int(r.info.get("rounds", 0)) for r in rows] or [0])
    head = "| Geometry | Preset | Image | Resized (tokens) | Ours | transformers' | Ours faster by |"
    rule = "|---|---|---|---|---|---|---|"
    head += " (wall time) |" if on_cpu else ""
    rule += "---|" if on_cpu else ""
    head += " pixel_values, ours vs theirs | grid_thw |" + (" ours vs CPU processor | theirs vs CPU processor |"
                                                            if accel else "")
    rule += "---|---|" + ("---|---|" if accel else "")
    out = ["", f"### Preprocessing: ours against transformers' `{section.get('processor', '?')}` (device "
           f"`{device}`, no model)", "",
           "Resize + rescale + normalise + patchify of one uint8 image from the host to `pixel_values` on the device: "
           "ours (`vision/fast_preprocess.py`, with the target size and the upload) against transformers' "
           "torchvision processor given the same tensor and `device=`. Times: median wall time over "
           f"{rounds} round(s) (min-max); the two alternate within each round, order flipped every round. "
           "\"Ours faster by\" = transformers' time / ours, computed inside each round from "
           + ("process CPU time (median, min-max)" if on_cpu else "synchronised wall time (median, min-max)")
           + "; above 1.00x ours is faster. Exactness from one untimed call of each.", "", head, rule]
    for r in rows:
        geo, preset, size = r.id.split(".", 1)[1].rsplit(".", 2)
        i = r.info
        resized = f"{i['size_resized'][1]}x{i['size_resized'][0]} ({i['tokens']})" if i.get("size_resized") else "-"
        line = (f"| {geo} | `{preset}` | {size} | {resized} | {spread(r, 'ours_s', 'time')} | "
                f"{spread(r, 'theirs_s', 'time')} | {spread(r, 'speedup')} |")
        line += f" {spread(r, 'wall_speedup')} |" if on_cpu else ""
        grid = "-" if "grid_equal" not in i else ("identical" if i["grid_equal"] else "**differs**")
        line += f" {exactness(i)} | {grid} |"
        if accel:
            line += f" {exactness(i, 'ours_vs_cpu_max_abs_diff')} | {exactness(i, 'theirs_vs_cpu_max_abs_diff')} |"
        out.append(line)
    out.append("")
    out += status_note(rows)
    out += [f"- note: {n}" for n in section.get("notes", [])]
    return out
