"""A real llama.cpp ``llama-server`` and a tiny Qwen2.5-VL GGUF pair, for tests and the benchmark.

Not a test module. The binary and llama.cpp's source (``convert_hf_to_gguf.py``, ``gguf-py``) come from
``.ci/install_llama_server.sh`` (under ``.ci-work/llama.cpp``), or ``$QWENVL_FAST_LLAMA_SERVER`` and
``$QWENVL_FAST_LLAMA_SRC``. Without them the fixtures skip, with the reason.

The GGUF pair: the synthetic preset ``tiny-qwen2.5-vl-h64-d3`` (random weights, the pack's real tokenizer and
processor; head size 64 as for vLLM, 3 vision blocks because the projector conversion cannot map 2), written as
a model folder and converted with llama.cpp's own converter: ``model-<outtype>.gguf`` and
``mmproj-model-f16.gguf``. Cached under ``.ci-work/gguf/<hash>``, keyed by the preset, the outtype and the
converter's own bytes, so a second session converts nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
LLAMA_WORK = REPO_ROOT / ".ci-work" / "llama.cpp"
INSTALL_MARKER = ".complete-0.3.36"
SRC_ENV = "QWENVL_FAST_LLAMA_SRC"
GGUF_PRESET = "tiny-qwen2.5-vl-h64-d3"
GGUF_CACHE = REPO_ROOT / ".ci-work" / "gguf"
MODEL_FOLDER = "tiny-qwen2.5-vl-gguf"


def llama_server_path() -> Path:
    configured = os.environ.get("QWENVL_FAST_LLAMA_SERVER", "").strip()
    return Path(configured) if configured else LLAMA_WORK / "build" / "bin" / "llama-server"


def llama_src() -> Path:
    configured = os.environ.get(SRC_ENV, "").strip()
    return Path(configured) if configured else LLAMA_WORK / "src"


def llama_missing_reason() -> str | None:
    """Why no llama-server can be started here, or None."""
    binary = llama_server_path()
    if not binary.is_file():
        return (f"llama-server not built at {binary} (run `bash .ci/install_llama_server.sh`, or set "
                "$QWENVL_FAST_LLAMA_SERVER)")
    if "QWENVL_FAST_LLAMA_SERVER" not in os.environ and not (LLAMA_WORK / INSTALL_MARKER).is_file():
        return f"llama-server build at {LLAMA_WORK} is incomplete (no {INSTALL_MARKER}); run the install script again"
    if not (llama_src() / "convert_hf_to_gguf.py").is_file():
        return f"llama.cpp's convert_hf_to_gguf.py not found under {llama_src()} (set ${SRC_ENV})"
    try:
        import sentencepiece  # noqa: F401 (the converter imports it even for a BPE tokenizer)
    except ImportError:
        return "sentencepiece is not installed (pip install 'sentencepiece<0.3'; requirements-dev.txt)"
    return None


# The converter names the tokenizer's pre-tokenizer by hashing how it splits a test text; the test tokenizer (one
# token per byte, no merges) matches no published model. Its bytes split the same under any regex, so it is named
# "qwen2" (what a real Qwen2.5-VL gets), and the real script runs unchanged otherwise.
_CONVERT = """
import runpy, sys
from conversion.base import TextModel
TextModel.get_vocab_base_pre = lambda self, tokenizer: "qwen2"
script = sys.argv.pop(1)
sys.argv[0] = script
runpy.run_path(script, run_name="__main__")
"""


def _convert(src: Path, hf_dir: Path, out: Path, outtype: str, mmproj: bool) -> None:
    cmd = [sys.executable, "-c", _CONVERT, str(src / "convert_hf_to_gguf.py"), str(hf_dir), "--outtype", outtype,
           "--outfile", str(out)] + (["--mmproj"] if mmproj else [])
    env = {**os.environ, "PYTHONPATH": f"{src}{os.pathsep}{src / 'gguf-py'}", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0 or not out.is_file():
        raise RuntimeError(f"convert_hf_to_gguf.py failed ({done.returncode}):\n{done.stdout[-3000:]}"
                           f"\n{done.stderr[-3000:]}")


def _add_one_merge(tokenizer_json: Path) -> None:
    """llama.cpp refuses a BPE vocabulary without merges; the test tokenizer has none (one token per byte). One
    merge ("ĠĠ", two spaces) with its token after the special tokens makes it loadable and changes nothing else.

    The special tokens also go into the BPE model's vocabulary, at their own ids: the ``tokenizers`` library gives
    an added token that is not in the model's vocabulary the id ``model vocabulary size + n`` and ignores the id
    the file states, so a vocabulary of 256 bytes plus the merge's token would move every special token up by one
    (``<|im_end|>`` at 259, ``<|im_start|>`` at the config's eos id 258, ``</think>`` on the merge's id) and the
    GGUF would inherit that. A real Qwen vocabulary is dense (its added tokens follow its model vocabulary)."""
    data = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    model = data["model"]
    if model.get("merges"):  # a real vocabulary (the real-size synthetic presets: Qwen's own) is loadable as it is
        return
    for added in data.get("added_tokens", []):
        model["vocab"].setdefault(added["content"], added["id"])
    next_id = 1 + max(model["vocab"].values())
    model["vocab"]["\u0120\u0120"] = next_id
    model["merges"] = [["\u0120", "\u0120"]] if model.get("merges") == [] or isinstance(
        (model.get("merges") or [None])[0], list) else ["\u0120 \u0120"]
    tokenizer_json.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


def _key(outtypes: tuple[str, ...], preset: str) -> str:
    from qwenvl_fast.sources import synthetic

    p, _ = synthetic.parse_synthetic_name(preset)
    h = hashlib.sha256(json.dumps({"preset": preset, "vision": p.vision, "text": p.text, "vocab": p.vocab_size,
                                   "outtypes": outtypes}, sort_keys=True, default=str).encode())
    h.update((llama_src() / "convert_hf_to_gguf.py").read_bytes())
    h.update(b"one merge, special tokens in the model vocabulary")
    return h.hexdigest()[:16]


def gguf_models_root(outtypes: tuple[str, ...] = ("f16", "q8_0"), preset: str = GGUF_PRESET) -> Path:
    """A model folder root holding ``<MODEL_FOLDER>/model-<t>.gguf`` per outtype and one ``mmproj-model-f16.gguf``
    (built once, then cached)."""
    root = GGUF_CACHE / _key(outtypes, preset)
    folder = root / MODEL_FOLDER
    if (root / ".complete").is_file():
        return root
    from qwenvl_fast.sources import synthetic

    shutil.rmtree(root, ignore_errors=True)
    folder.mkdir(parents=True)
    hf_dir = root / "hf"
    synthetic.save_synthetic(f"synthetic:{preset}", hf_dir)
    _add_one_merge(hf_dir / "tokenizer.json")
    src = llama_src()
    for t in outtypes:
        _convert(src, hf_dir, folder / f"model-{t}.gguf", t, mmproj=False)
    _convert(src, hf_dir, folder / "mmproj-model-f16.gguf", "f16", mmproj=True)
    shutil.rmtree(hf_dir)  # a folder with config.json would be listed as a model beside the GGUF ones
    (root / ".complete").write_text("ok")
    return root


@pytest.fixture(scope="session")
def gguf_root() -> Path:
    """Skips with the reason when llama-server or the converter is not here; else the cached tiny GGUF pair's root,
    with ``$QWENVL_FAST_LLAMA_SERVER`` pointing at the built binary for the whole session."""
    reason = llama_missing_reason()
    if reason:
        pytest.skip(reason)
    os.environ.setdefault("QWENVL_FAST_LLAMA_SERVER", str(llama_server_path()))
    return gguf_models_root()


def llama_server_pids(containing: str | None = None) -> list[int]:
    """Pids of running ``llama-server`` processes (Linux /proc; zombies excluded), only those whose command line
    holds ``containing`` if given (e.g. a model folder)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if containing is not None and not any(containing.encode() in part for part in cmdline):
            continue
        if cmdline and cmdline[0].endswith(b"llama-server") and state != "Z":
            pids.append(int(entry.name))
    return pids


def process_running(pid: int) -> bool:
    """Some thread of ``pid`` is alive (not a zombie, not dead): a killed process's cmdline empties, and its leader
    shows as a zombie, before its other threads have exited."""
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return False
    for task in tasks:
        try:
            state = (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state not in ("Z", "X"):
            return True
    return False
