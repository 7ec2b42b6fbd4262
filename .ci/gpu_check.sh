#!/usr/bin/env bash
# Every GPU check and the GPU benchmark in one call (for a lent GPU machine; CI has none).
# Expects wheels in .whl/ (transformers 5.24, diskcache, platformdirs, optionally bitsandbytes) and writes logs to $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT="${OUT:-/tmp/gpu_out}"; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site-old .whl/diskcache-*.whl
python3 -c "import torch, transformers; print('native:', torch.__version__, transformers.__version__)"
# 1. The machine's own transformers (5.17, no mm_encoder_outputs: the get_image_features fallback path).
PYTHONPATH=/tmp/site-old timeout 120 python3 -m pytest -q -x -p no:cacheprovider tests/test_gpu.py \
  "tests/test_embedding_cache.py::test_same_tokens_with_cache_off_miss_and_hit" 2>&1 | tee "$OUT/tests_native.log" | tail -15
# 2. transformers 5.24 (mm_encoder_outputs path), plus the preprocessing CUDA tests.
PYTHONPATH=/tmp/site timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_fast_preprocess.py \
  tests/test_compiled_decode.py 2>&1 | tee "$OUT/tests_524.log" | tail -15
# 2b. Compiled decode against the weight-bandwidth floor (Qwen2.5-VL-3B language model, bf16).
PYTHONPATH=/tmp/site timeout 240 python3 docs/measurements/gpu_decode_check.py 2>&1 | tee "$OUT/decode_check.log" | tail -20
# 3. The benchmark with the real towers in bf16.
for m in synthetic:qwen2.5-vl-3b synthetic:qwen3-vl-4b; do
  tag=$(echo "$m" | tr ':.' '__')
  PYTHONPATH=/tmp/site timeout 120 python3 bench/benchmark.py --model "$m" --device cuda --dtype bf16 --time-budget 90 \
    --markdown "$OUT/bench_$tag.md" --json "$OUT/bench_$tag.json" 2>&1 | tail -60 | tee "$OUT/bench_$tag.log"
done
# 4. Our tensor-native preprocessing against transformers' image processor on the device (it ties on a CPU; the
#    CUDA row decides whether vision/fast_preprocess.py stays).
PYTHONPATH=/tmp/site timeout 120 python3 bench/benchmark.py --only preprocess --device cuda \
  --markdown "$OUT/bench_preprocess.md" --json "$OUT/bench_preprocess.json" 2>&1 | tail -30 | tee "$OUT/bench_preprocess.log"
