#!/usr/bin/env bash
# Everything a lent GPU machine should run, in one call (`device` tool, ~10 min):
#   bash benchmarks/gpu_run.sh            (writes under $OUT, default ./gpu-out)
# The GPU machines have torch + triton but no diffusers/transformers/torchao/optimum-quanto: carry
# them as wheels in wheels/ (see README "Notes") and they are installed here without touching torch.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
if ls wheels/*.whl >/dev/null 2>&1; then
  pip install --quiet --no-deps wheels/*.whl 2>&1 | tail -2
fi
pip install --quiet --no-deps -e . 2>&1 | tail -2
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
python - <<'PY' > "$OUT/versions.json"
import json, torch, triton
v = {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
     "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
for m in ("diffusers", "transformers", "torchao", "optimum.quanto"):
    try:
        v[m] = __import__(m, fromlist=["__version__"]).__version__
    except Exception as e:  # noqa: BLE001
        v[m] = f"missing: {e}"
print(json.dumps(v, indent=2))
PY
# 1. correctness at real shapes (bf16, fp8)
timeout 300 python -m pytest -q tests/test_kernels_gpu.py tests/test_fast_path_gpu.py tests/test_kernels.py tests/test_attention_processor.py \
  -p no:cacheprovider > "$OUT/gpu-tests.txt" 2>&1; echo "gpu tests rc=$?" >> "$OUT/gpu-tests.txt"
# 2. attention: ours vs every SDPA backend
timeout 180 python benchmarks/bench_attention.py --out "$OUT/attention.json" > "$OUT/attention.log" 2>&1
# 3. pipeline ablation on the full-size random model, time-boxed; reports are rewritten after every
#    configuration, so a timeout still leaves the finished ones. BENCH_ARGS replaces the default subset.
DEFAULT_BENCH="--sizes 1440x512 1024x1024 --no-official --repeats 2 --configs diffusers ours-eager +compile \
  +compile+triton +compile+triton-fp8 all all+cache-high"
timeout 420 srpo-infer bench --model full-random ${BENCH_ARGS:-$DEFAULT_BENCH} --out "$OUT/pipeline" \
  > "$OUT/pipeline.log" 2>&1
echo "done; results in $OUT"
