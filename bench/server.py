"""Server backend benchmark: Caption Folder against one OpenAI-compatible server, N requests in flight vs 1.

Both settings run in the same process against the same server, alternating, so the ratio is paired:

    python bench/server.py --server-url http://127.0.0.1:8000/v1 --images 16 --in-flight 8 \\
        --new-tokens 32 --repeats 3 --json docs/benchmark-server.json

The images are deterministic noise, written to a temporary folder; answers have a fixed length
(``min_new_tokens = max_new_tokens``, sent as ``ignore_eos`` where the server supports it).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import pack_path  # noqa: E402

pack_path.import_pack()
from bench.inputs import cut_by_design  # noqa: E402
from qwenvl_fast import qwenvl_loader as ql  # noqa: E402
from qwenvl_fast.captioning import caption_folder  # noqa: E402


def write_images(folder: Path, n: int, size: tuple[int, int], seed: int = 0) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, size=(size[0], size[1], 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")


def caption_once(url: str, model: str, folder: Path, in_flight: int, new_tokens: int, quality: str) -> float:
    options = ql.LoadOptions(model="(served)", backend="server", server_url=url, server_model=model,
                             server_max_in_flight=in_flight)
    request = ql.GenerationRequest(prompt="Write a short caption.", image_quality=quality,
                                   max_new_tokens=new_tokens, min_new_tokens=new_tokens, monitor=False)
    t0 = time.perf_counter()
    results = caption_folder(options, folder, request, write_txt=False)
    elapsed = time.perf_counter() - t0
    if not all(r.status == "captioned" or cut_by_design(r.status) for r in results):
        raise RuntimeError(f"not every image was captioned: {[r.status for r in results]}")
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server-url", required=True)
    parser.add_argument("--server-model", default="")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--in-flight", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--quality", default="fast")
    parser.add_argument("--size", type=int, nargs=2, default=(384, 512), metavar=("H", "W"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_images(folder, args.images, tuple(args.size))
        caption_once(args.server_url, args.server_model, folder, args.in_flight, 2, args.quality)  # warm-up
        times: dict[int, list[float]] = {1: [], args.in_flight: []}
        for r in range(args.repeats):
            order = [1, args.in_flight] if r % 2 == 0 else [args.in_flight, 1]
            for n in order:
                times[n].append(caption_once(args.server_url, args.server_model, folder, n, args.new_tokens,
                                             args.quality))
        ql.MANAGER.release()
    ratios = [a / b for a, b in zip(times[1], times[args.in_flight])]
    captions = args.images
    print(f"Caption Folder, {captions} images x {args.new_tokens} new tokens, `{args.quality}`, {args.server_url}")
    print("| requests in flight | median s | min-max s | captions/s |")
    print("| --- | --- | --- | --- |")
    for n in (1, args.in_flight):
        med = statistics.median(times[n])
        print(f"| {n} | {med:.2f} | {min(times[n]):.2f}-{max(times[n]):.2f} | {captions / med:.2f} |")
    print(f"paired ratio (1 in flight / {args.in_flight} in flight): median {statistics.median(ratios):.2f}x, "
          f"range {min(ratios):.2f}-{max(ratios):.2f}x over {len(ratios)} rounds")
    if args.json:
        args.json.write_text(json.dumps({
            "machine": platform.platform(), "processor": platform.processor(), "args": {
                k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "seconds": {str(k): v for k, v in times.items()}, "ratios": ratios}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
