#!/usr/bin/env bash
# Build llama.cpp's llama-server (CPU, static) from the llama.cpp source that PyPI's llama-cpp-python sdist
# vendors, for the tests and the benchmark against a real llama-server. Nothing else is downloaded: CMake is
# told not to fetch the web UI. Cached under .ci-work/llama.cpp; a second run only checks (< 1 s).
# Prints the path of the binary and of the source tree (convert_hf_to_gguf.py, gguf-py) on its last two lines.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VERSION="0.3.36"
WORK=".ci-work/llama.cpp"
SRC="$WORK/src"
BUILD="$WORK/build"
BIN="$BUILD/bin/llama-server"
if [ ! -f "$WORK/.complete-$VERSION" ]; then
    PY="${PYTHON:-.venv/bin/python}"
    rm -rf "$WORK"
    mkdir -p "$WORK/dl"
    "$PY" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$WORK/dl"
    tar -xzf "$WORK/dl/llama_cpp_python-$VERSION.tar.gz" -C "$WORK/dl"
    mv "$WORK/dl/llama_cpp_python-$VERSION/vendor/llama.cpp" "$SRC"
    rm -rf "$WORK/dl"
    if ! command -v ninja >/dev/null 2>&1 && ! "$PY" -c "import ninja" 2>/dev/null; then
        "$PY" -m pip install -q ninja
    fi
    NINJA_DIR="$("$PY" -c 'import ninja, os; print(ninja.BIN_DIR)' 2>/dev/null || true)"
    [ -n "$NINJA_DIR" ] && export PATH="$NINJA_DIR:$PATH"
    if ! command -v cmake >/dev/null 2>&1; then  # PyPI's cmake wheel where the machine has none
        "$PY" -m pip install -q "cmake>=3.21"
        export PATH="$(dirname "$PY"):$PATH"
    fi
    cmake -S "$SRC" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=OFF \
        -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_TESTS=OFF \
        -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_SERVER=ON >"$WORK/cmake.log" 2>&1 \
        || { tail -n 40 "$WORK/cmake.log"; exit 1; }
    cmake --build "$BUILD" --target llama-server -j"$(nproc)" >"$WORK/build.log" 2>&1 \
        || { tail -n 40 "$WORK/build.log"; exit 1; }
    touch "$WORK/.complete-$VERSION"
fi
"$BIN" --version >/dev/null 2>&1 || { echo "install_llama_server: $BIN does not run" >&2; exit 1; }
echo "$(pwd)/$BIN"
echo "$(pwd)/$SRC"
