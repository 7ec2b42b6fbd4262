#!/usr/bin/env python
"""Qwen-VL Fast benchmark: every speed claim of the seed guide, measured side by side in one run.

    python bench/benchmark.py --quick --json out.json                     # smoke run, tiny models, < 1 min
    python bench/benchmark.py --model synthetic:qwen2.5-vl-3b@1 --repeats 1 --multi-quality fast \
        --compile-quality fast --compile-budget 480 --markdown docs/benchmark-cpu.md   # ~9 min on 2 idle cores
    python bench/benchmark.py --model synthetic:qwen2.5-vl-3b --device cuda --dtype bf16 --time-budget 170
    python bench/benchmark.py --model synthetic:qwen3-vl-4b --device cuda --time-budget 170
    python bench/benchmark.py --only preprocess --markdown docs/benchmark-cpu-preprocess.md   # no model

``synthetic:`` models are the real transformers architectures with random weights: compute time does
not depend on weight values, so the timings are real (the text is not). ``@N`` shortens the language
model to N layers (CPU); the vision tower is never shortened.

What is measured (each section alternates its variants within every round, rotating the order from
round to round; a ratio is computed inside each round, then the median over rounds is reported):

1. single image: the reference path (how existing packs embed an image) and the pack path at each
   quality preset (fast tensor preprocessing + pinned upload + encode, a cache miss), and right after
   the ``balanced`` miss the memory-tier hits (with and without the digest memo);
2. hashing a float image with and without the digest memo;
3. multi-image: 4 images in one encode call vs one by one;
4. end-to-end generation with a fixed number of new tokens: reference vs pack (miss) vs pack (hit);
5. disk-tier hit in a fresh process (a child process loads the model and reads the disk cache the
   parent wrote; model load is not counted);
6. torch.compile of the vision tower on vs off (a child process, bounded by --compile-budget), when
   ``vision/tower_compile.py`` is present;
7. answers after the first token (prefix reuse, batched answers, decode vs floor, Caption Folder);
8. video: a clip of random frames (a ComfyUI IMAGE batch) encoded through the video path against frames and
   preset (a cache miss), then the same clip again (a memory-tier hit: no vision tower);
9. preprocessing (no model): ``vision/fast_preprocess.py`` against transformers' torchvision image processor on
   the same device and images (several sizes, two presets, Qwen2.5-VL and Qwen3-VL geometry), with the max
   difference of their ``pixel_values`` and whether their grids agree (``--only preprocess``).

Ratios divide process CPU time on a CPU device (other tenants of a shared machine stretch wall time, not
the CPU time of the same work) and synchronised wall time on CUDA; both times are reported. The reference
path is what other packs do: PIL conversion, the processor on the CPU at the ultra budget, a pageable
``.to(device)``, transformers' stock vision attention, no cache, one image at a time.

The code is the ``bench`` package beside this file (see ``bench/__init__.py``); this file is its command line.

Outputs: markdown tables on stdout (and --markdown FILE), everything incl. raw samples in --json FILE.
Both files are rewritten after every section, so a run cut short still leaves its results;
``--render-json FILE`` re-renders the tables of a saved result. ``--time-budget`` skips (and marks) what
would start after it; the compile child is bounded by ``--compile-budget`` and killed with its workers.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this file's folder is on sys.path instead of the repository root: swap them, so that ``bench``
# (which imports the pack as ``qwenvl_fast``) is a package and its modules (cli, fmt, inputs...) are not top-level
# names. Child processes (``--child``) run this file too.
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(HERE.parent))

from bench.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
