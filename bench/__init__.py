"""The benchmark (``bench/benchmark.py``), the server benchmark (``bench/server.py``) and the Caption Folder
throughput benchmark (``bench/caption_throughput.py``: one by one, batched, a vLLM server): scripts that measure the
pack.

Nothing in the pack imports this package. Importing it puts the repository root on ``sys.path`` and imports the
pack as ``qwenvl_fast`` (``pack_path``), so that every module here can say ``from qwenvl_fast import ...``.

Modules, by concern: ``inputs`` (constants, synthetic images and clips), ``measure`` (clock, time budget, rows),
``rows`` (every row's id and label), ``bench_base`` and ``sections_*`` (the in-process measurements of one
model), ``preprocess`` (ours against transformers' image processor, no model), ``children`` (the ``--child``
processes: disk hit, compile), ``fmt``, ``report*`` (markdown and JSON), ``cli`` (options and the run).
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pack_path  # noqa: E402

pack_path.import_pack()
