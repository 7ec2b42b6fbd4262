"""The per-model tables of the image sections (single image, multi-image, attention, cache, e2e, compile)."""

from __future__ import annotations

import argparse
from typing import Any

from bench.fmt import View, cell, fmt_ratio, fmt_time, status_note
from bench.inputs import N_MULTI, PRESETS, SEED_CLAIMS
from bench.measure import ratio_basis
from bench.report_sections import answers_markdown, video_markdown


def single_tables(v: View) -> list[str]:
    """The single-image table by preset, with the cache-hit and torch.compile rows."""
    g, args, size, on_cpu, cpu, cpu_head, cpu_rule = v.g, v.args, v.size, v.on_cpu, v.cpu, v.cpu_head, v.cpu_rule
    out = [f"### Single {size}x{size} image: embedding time by preset (pack path, cache miss)", "",
            f"| Configuration | Visual tokens | Embedding time |{cpu_head} Speedup | Seed guide claimed |",
            f"|---|---|---|{cpu_rule}---|---|"]
    for p in PRESETS:
        r = g(f"single.{p}")
        out.append(f"| `{p}` quality | {cell(r, 'tokens', 'int')} | {cell(r, 'time_s')} |{cpu(r)} "
                   f"{cell(r, 'speedup_vs_ultra', 'ratio')} | {SEED_CLAIMS[p]} |")
    hit = g("cache.memory_hit")
    out.append(f"| `balanced` + cache (repeat: memory hit) | {cell(g('single.balanced'), 'tokens', 'int')} | "
               f"{cell(hit, 'time_s')} |{cpu(hit)} {cell(hit, 'miss_over_hit', 'ratio')} vs miss | "
               f"{SEED_CLAIMS['cache']} |")
    con, bal, ultra = g("compile.on"), g("single.balanced"), g("single.ultra")
    if (con is not None and con.status == "ok" and bal is not None and bal.status == "ok"
            and args.compile_quality == "balanced"):
        t = bal.metrics["time_s"] - bal.metrics["encode_s"] + con.metrics["time_s"]
        sp = fmt_ratio(ultra.metrics["time_s"] / t) if ultra is not None and ultra.status == "ok" else "-"
        out.append(f"| `balanced` + torch.compile | {cell(bal, 'tokens', 'int')} | {fmt_time(t)} |"
                   f"{' - |' if on_cpu else ''} {sp} (wall, not paired) | {SEED_CLAIMS['compile']} |")
    else:
        why = cell(con, "", "status") if con is not None and con.status != "ok" else \
            f"see the compile table (`{args.compile_quality}`)"
        out.append(f"| `balanced` + torch.compile | - | - |{' - |' if on_cpu else ''} {why} | "
                   f"{SEED_CLAIMS['compile']} |")
    out += ["", "Speedup: ultra / preset, computed within each round, median over rounds. Embedding time = hash + "
            "preprocess + upload + vision tower, as the engine records them (CPU time: the whole call). The cache row "
            "is the whole pre-generation path on a hit (hash memo + lookup + prompt inputs) against the same path on "
            "the miss. The seed guide's numbers (Qwen3-VL-4B, never measured) are shown for comparison.", ""]
    out += status_note([g(f"single.{p}") for p in PRESETS] + [hit])
    return out


def multi_tables(v: View) -> list[str]:
    """Several images in one encode call against one by one."""
    g, args, size, cpu, cpu_head, cpu_rule = v.g, v.args, v.size, v.cpu, v.cpu_head, v.cpu_rule
    out = ["", f"### Multi-image ({N_MULTI} images of {size}x{size}, `{args.multi_quality}`)", "",
            f"| Multi-image ({N_MULTI} images) | Total | Per image |{cpu_head} Speedup |",
            f"|---|---|---|{cpu_rule}---|"]
    for v in ("one_by_one", "batched"):
        r = g(f"multi.{v}")
        out.append(f"| {r.label if r else v} | {cell(r, 'time_s')} | {cell(r, 'per_image_s')} |{cpu(r)} "
                   f"{cell(r, 'speedup_vs_one_by_one', 'ratio')} |")
    out += ["", "Seed guide claimed (4 images, Qwen3-VL-4B): `ultra` ~14 s (~3.5 s per image), `balanced` ~6.8 s "
            "(~1.7 s per image). Here the same preset is compared batched vs one image per encode call.", ""]
    out += status_note([g("multi.one_by_one"), g("multi.batched")])
    return out


def attention_tables(v: View) -> list[str]:
    """Grouped SDPA against transformers' per-window vision attention."""
    g, args, size, cpu, cpu_head, cpu_rule = v.g, v.args, v.size, v.cpu, v.cpu_head, v.cpu_rule
    out = ["", f"### Vision attention without flash-attn (one {size}x{size} image, `{args.multi_quality}`, "
            "encode only)", "",
            f"| Attention | Encode |{cpu_head} Speedup |", f"|---|---|{cpu_rule}---|"]
    for v in ("per_window", "grouped"):
        r = g(f"attention.{v}")
        out.append(f"| {r.label if r else v} | {cell(r, 'time_s')} |{cpu(r)} {cell(r, 'speedup', 'ratio')} |")
    grouped_row = g("attention.grouped")
    if grouped_row is not None and "max_abs_diff" in grouped_row.info:
        out += ["", f"Same inputs, alternated within each round; max |grouped - per-window| = "
                f"{grouped_row.info['max_abs_diff']:.1e}."]
    out += [""]
    out += status_note([g("attention.per_window"), grouped_row])
    return out


def reference_tables(v: View) -> list[str]:
    """The reference path (how other packs embed an image) against the pack's."""
    g, size, on_cpu, cpu, cpu_head, cpu_rule, entry = v.g, v.size, v.on_cpu, v.cpu, v.cpu_head, v.cpu_rule, v.entry
    bal = g("single.balanced")
    out = ["", f"### Reference path vs pack path (one {size}x{size} image)", "",
            f"| Path | Visual tokens | Preprocess | Transfer | Encode | Total |{cpu_head} Speedup vs reference |",
            f"|---|---|---|---|---|---|{cpu_rule}---|"]
    ref = g("single.reference")
    out.append(f"| reference: PIL + processor (CPU) + pageable `.to()` + stock attention, ultra, no cache | "
               f"{cell(ref, 'tokens', 'int')} | {cell(ref, 'preprocess_s')} | {cell(ref, 'transfer_s')} | "
               f"{cell(ref, 'encode_s')} | {cell(ref, 'time_s')} |{cpu(ref)} 1.00x |")
    for p in ("ultra", "balanced"):
        r = g(f"single.{p}")
        out.append(f"| pack: tensor preprocess + pinned upload, `{p}` | {cell(r, 'tokens', 'int')} | "
                   f"{cell(r, 'preprocess_s')} | {cell(r, 'transfer_s')} | {cell(r, 'encode_s')} | "
                   f"{cell(r, 'time_s')} |{cpu(r)} {cell(r, 'speedup_vs_reference', 'ratio')} |")
    out += ["", "Pack preprocess includes canonicalisation and the MD5 of the image (cache key). Compile is "
            "measured separately below (the main process runs the tower eagerly).", ""]
    attn = entry.get("vision_attention")
    if attn and attn != entry.get("attention"):
        out += [f"The pack's vision attention here is `{attn}`; the reference runs transformers' stock attention "
                f"(`{entry.get('attention', 'sdpa')}`), as other packs do.", ""]
    miss_e2e = g("e2e.pack_miss")
    if bal is not None and bal.status == "ok" and miss_e2e is not None and miss_e2e.status == "ok":
        a, b = bal.metrics["time_s"], miss_e2e.metrics["embed_s"]
        line = (f"Noise check: the `balanced` miss was embedded twice, minutes apart, with identical work (above, "
                f"and in the end-to-end rows below): wall {fmt_time(a)} vs {fmt_time(b)} "
                f"({abs(a / b - 1) * 100:.0f}% apart)")
        hit_row = g("e2e.pack_hit")
        if on_cpu and hit_row is not None and hit_row.status == "ok":
            ca, cb = bal.metrics["cpu_s"], miss_e2e.metrics["cpu_s"] - hit_row.metrics["cpu_s"]
            line += (f"; CPU time {fmt_time(ca)} vs {fmt_time(cb)} (end-to-end miss minus hit) "
                     f"({abs(ca / cb - 1) * 100:.0f}% apart)")
        out += [line + ". Paired ratios (same round) are less exposed than rows measured far apart.", ""]
    out += status_note([ref])
    return out


def cache_tables(v: View) -> list[str]:
    """Memory and disk-tier hits, hashing and the digest memo."""
    g, on_cpu, cpu, cpu_head, cpu_rule = v.g, v.on_cpu, v.cpu, v.cpu_head, v.cpu_rule
    hit = g("cache.memory_hit")
    out = ["", "### Embedding cache", "", f"| Path | Time |{cpu_head} Miss / hit |", f"|---|---|{cpu_rule}---|"]
    miss = hit.m("miss_s") if hit is not None else None
    miss_cpu = hit.m("miss_cpu_s") if hit is not None else None
    out.append(f"| miss: hash + lookup + preprocess + encode + store + prompt inputs (`balanced`) | "
               f"{fmt_time(miss)} |{f' {fmt_time(miss_cpu)} |' if on_cpu else ''} 1x |")
    for rid in ("cache.memory_hit", "cache.memory_hit_rehash"):
        r = g(rid)
        out.append(f"| {r.label if r else rid} | {cell(r, 'time_s')} |{cpu(r)} {cell(r, 'miss_over_hit', 'ratio')} |")
    d = g("cache.disk_hit")
    out.append(f"| disk-tier hit, fresh process, first | {cell(d, 'first_s')} |{cpu(d, 'first_cpu_s')} "
               f"{cell(d, 'miss_over_first_hit', 'ratio')} |")
    out.append(f"| disk-tier hit, fresh process, median (memory tier cleared before each) | {cell(d, 'time_s')} |"
               f"{cpu(d)} {cell(d, 'miss_over_hit', 'ratio')} |")
    for rid in ("hash.no_memo", "hash.memo", "hash.detail_score"):
        r = g(rid)
        ratio = f"{cell(r, 'no_memo_over_memo', 'ratio')} (wall)" if rid == "hash.memo" else ""
        out.append(f"| {r.label if r else rid} | {cell(r, 'time_s')} |{cpu(r)} {ratio} |")
    out += ["", "Memory-hit ratios are paired within rounds; the disk hit runs in a child process, so its ratio is "
            "median miss / median hit. Model load in the child is not counted.", ""]
    out += status_note([g("cache.memory_hit"), g("cache.memory_hit_rehash"), d, g("hash.no_memo"), g("hash.memo"),
                            g("hash.detail_score")])
    return out


def e2e_tables(v: View) -> list[str]:
    """End-to-end generation: reference, pack miss, pack hit."""
    g, args, size, basis, on_cpu = v.g, v.args, v.size, v.basis, v.on_cpu
    cpu, cpu_head, cpu_rule = v.cpu, v.cpu_head, v.cpu_rule
    ref = g("single.reference")
    n = args.new_tokens
    out = ["", f"### End-to-end generation (one {size}x{size} image, exactly {n} new tokens)", "",
            f"| Configuration | Total | Embedding | Prefill | Decode |{cpu_head} Speedup vs reference |",
            f"|---|---|---|---|---|{cpu_rule}---|"]
    for rid in ("e2e.reference", "e2e.pack_miss", "e2e.pack_hit"):
        r = g(rid)
        sp = "1.00x" if rid == "e2e.reference" and r is not None and r.status == "ok" else \
            cell(r, "speedup_vs_reference", "ratio")
        out.append(f"| {r.label if r else rid} | {cell(r, 'time_s')} | {cell(r, 'embed_s')} | "
                   f"{cell(r, 'prefill_s')} | {cell(r, 'decode_s')} |{cpu(r)} {sp} |")
    hit_e2e = g("e2e.pack_hit")
    out += ["", f"Pack hit vs pack miss: {cell(hit_e2e, 'speedup_vs_miss', 'ratio')}. The reference's stages are "
            "inside one `generate()` call and are not split."]
    e2e_ref = g("e2e.reference")
    if e2e_ref is not None and e2e_ref.status == "ok" and ref is not None and ref.status == "ok":
        gen = e2e_ref.metrics[basis] - ref.metrics[basis]
        if gen > 0:
            out[-1] += (f" Its prefill + decode is about {fmt_time(gen)} of {'CPU' if on_cpu else 'wall'} time (its "
                        "total minus the reference embedding measured in the single-image rows; not paired).")
    out.append("")
    out += status_note([e2e_ref, g("e2e.pack_miss"), hit_e2e])
    return out


def compile_tables(v: View) -> list[str]:
    """torch.compile of the vision tower against eager (a child process)."""
    g, args, size, on_cpu, cpu, cpu_head, cpu_rule = v.g, v.args, v.size, v.on_cpu, v.cpu, v.cpu_head, v.cpu_rule
    out = ["", f"### torch.compile of the vision tower (one {size}x{size} image at `{args.compile_quality}`, "
            "encode only)", "",
            f"| Configuration | Encode (steady state) |{cpu_head} Speedup | Warm-up (1st, 2nd call) |",
            f"|---|---|{cpu_rule}---|---|"]
    off, on = g("compile.off"), g("compile.on")
    if off is not None and off.status == "ok":
        out.append(f"| eager | {cell(off, 'time_s')} |{cpu(off)} 1.00x | - |")
    else:
        out.append(f"| eager | - |{' - |' if on_cpu else ''} - | {cell(off, '', 'status')} |")
    if on is not None and on.status == "ok":
        out.append(f"| compiled | {cell(on, 'time_s')} |{cpu(on)} {cell(on, 'speedup_vs_eager', 'ratio')} | "
                   f"{cell(on, 'warmup_first_s')}, {cell(on, 'warmup_second_s')} |")
        out += ["", f"Child process; eager and compiled alternate within each round (eager via "
                f"`torch.compiler.set_stance('force_eager')`); max |compiled - eager| = "
                f"{on.info.get('max_abs_diff', float('nan')):.1e}. {on.info.get('note') or ''}"]
    else:
        out.append(f"| compiled | - |{' - |' if on_cpu else ''} - | {cell(on, '', 'status')} |")
    out.append("")
    return out


def model_markdown(entry: dict[str, Any], args: argparse.Namespace) -> str:
    """One model's section of the report: a header, then the tables of the sections this run measured."""
    on_cpu = ratio_basis(entry.get("device") or "cpu") == "cpu_s"
    out = [f"## {entry['model']} ({entry.get('family', '?')}, {entry.get('device', '?')}, {entry.get('dtype', '?')})",
           ""]
    if entry.get("error"):
        out += [f"**failed:** {entry['error']}", ""]
    if entry.get("skipped"):
        out += [f"**skipped:** {entry['skipped']}", ""]
    out += [f"Model build {fmt_time(entry.get('load_s'))}. Rounds per row are in the JSON (`info.rounds`). "
            + ("Times are wall clock; **speedups are paired ratios of process CPU time** (all threads), which other "
               "tenants of a shared CPU hardly change, unlike wall time." if on_cpu else
               "Times are wall clock with the device synchronised; speedups are paired ratios of them."), ""]
    if args.only == ["answers"]:
        return "\n".join(out + answers_markdown(entry, args) + [""])
    if args.only == ["video"]:
        return "\n".join(out + video_markdown(entry, args) + [""])

    v = View(entry, args)
    for part in (single_tables, multi_tables, attention_tables, reference_tables, cache_tables, e2e_tables,
                 compile_tables):
        out += part(v)
    out += answers_markdown(entry, args)
    out += video_markdown(entry, args)
    return "\n".join(out)
