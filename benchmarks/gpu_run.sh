#!/usr/bin/env bash
# One call on a lent H100/H200 (`device` tool, 10-minute limit): every GPU measurement the open issues
# ask for, most important first, inside a 9-minute budget (BUDGET_S) that includes installing the
# carried wheels. Each step gets min(its own box, what is left); a step cut short loses only itself.
#
#   run(command="bash benchmarks/gpu_run.sh", carry=[".whl"], timeout_s=600)
#
# The GPU machines have torch + triton + transformers but no diffusers/torchao/optimum-quanto: carry
# them as wheels in .whl/ (README, "Measuring on a GPU"): diffusers==0.42.1 torchao==0.17.0
# optimum-quanto==0.2.7 importlib-metadata==8.7.0 sageattention==1.0.6 (the attention bench's 8-bit
# rival; its rows say "skipped" when the wheel is missing). Results: at most 8 files under $OUT
#   log.txt                    versions, GPU, every step's output, the GPU tests, the CUDA graphs rows
#   attention.json/.md         benchmarks/bench_attention.py --sweep: SDPA rivals, our kernels, every config
#   bench.json/.md/.png        srpo-infer bench: +compile vs +compile+triton(-int8-fp8), diffusers, ... (1024², 1440×512)
#   warmup-cold.json/-warm.json  srpo-infer warmup in two fresh processes (the second loads the saved cache)
# CPU dry run of the plumbing (in an environment with the project's dependencies):
#   MODEL=tiny-random ATTENTION_ARGS=--smoke OUT=/tmp/gpu-out bash benchmarks/gpu_run.sh
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
OUT=${OUT:-$REPO/gpu-out}
MODEL=${MODEL:-full-random}
BUDGET_S=${BUDGET_S:-540}
START=$SECONDS
mkdir -p "$OUT"
LOG="$OUT/log.txt"
export PYTHONUNBUFFERED=1

left() { echo $((BUDGET_S - (SECONDS - START))); }
# step NAME BOX_S COMMAND...: runs COMMAND for at most min(BOX_S, time left), logging to log.txt.
step() {
  local name=$1 box=$2; shift 2
  local limit; limit=$(left)
  ((box < limit)) && limit=$box
  if ((limit < 20)); then
    echo "== $name: skipped, ${limit}s left of the budget" >>"$LOG"
    return 0
  fi
  echo "== $name (box ${limit}s, $(($SECONDS - START))s into the run)" >>"$LOG"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  echo "== $name: rc=$rc in $((SECONDS - t0))s$([ $rc = 124 ] && echo ' (TIMED OUT)')" >>"$LOG"
}

# 0. Install the carried wheels and the project into a private folder; never touch the machine's torch.
SITE=${SITE:-/tmp/srpo-site}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
    >>"$LOG" 2>&1 || echo "wheel install failed" >>"$LOG"
fi
python3 -m pip install -q --no-deps --no-build-isolation --no-compile --target "$SITE" . >>"$LOG" 2>&1 \
  || echo "project install failed" >>"$LOG"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
# From the repo root `import srpo_infer` would find the source tree, which has no srpo_infer.kernels.
WORK=$(mktemp -d)
cd "$WORK" || exit 1
{
  echo "== versions ($(($SECONDS - START))s)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
  python3 - <<'PY'
import json, torch
v = {"torch": torch.__version__, "cuda": torch.version.cuda,
     "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
for m in ("triton", "diffusers", "transformers", "torchao", "optimum.quanto", "sageattention", "srpo_infer"):
    try:
        mod = __import__(m, fromlist=["__version__"])
        v[m] = getattr(mod, "__version__", "?") + ("" if m != "srpo_infer" else f" at {mod.__file__}")
    except Exception as e:
        v[m] = f"missing: {e}"
print(json.dumps(v, indent=2))
PY
  git -C "$REPO" log -1 --format='commit %H %s' 2>&1
} >>"$LOG" 2>&1
CLI=(python3 -m srpo_infer.cli)

# 0. The ws design's correctness before any timing of it (issue 38): the Gluon kernel against the torch
#    emulation of its schedule and float64 attention, every mode; never run on a GPU before this.
step "ws correctness" 60 python3 -m pytest -q -p no:cacheprovider --rootdir "$REPO" -c "$REPO/pyproject.toml" \
  -o "addopts=-ra" "$REPO/tests/test_kernels_gpu.py" -k ws

# 1. Attention at the Flux shapes (issue 10): every SDPA rival (eager, compiled prologue, bare cuDNN),
#    our kernels autotuned per design, then the sweep of every design x configuration.
# shellcheck disable=SC2086  # ATTENTION_ARGS is a word list on purpose
step "attention bench + sweep" 170 python3 "$REPO/benchmarks/bench_attention.py" \
  ${ATTENTION_ARGS:---sizes 1024x1024 1440x512} --sweep --out "$OUT/attention.json"

# 2. Correctness at real shapes (both designs, bf16 and fp8) and the compiled paths on the tiny model.
# addopts replaced: the project's ask for pytest-xdist workers (-n 2), which the GPU machine does not have.
step "gpu tests" 100 python3 -m pytest -q -p no:cacheprovider --rootdir "$REPO" -c "$REPO/pyproject.toml" \
  -o "addopts=-ra" "$REPO/tests/test_kernels_gpu.py" "$REPO/tests/test_fast_path_gpu.py"

# 3. The pipeline ablation, our kernels against +compile first (issue 10), then issue 9's rows while
#    time lasts. The report is rewritten after every row.
step "pipeline bench" 230 "${CLI[@]}" bench --model "$MODEL" --sizes 1024x1024 1440x512 --no-official --repeats 2 \
  --config-timeout 100 --out "$WORK/bench" \
  --configs +compile +compile+triton +compile+triton-int8-fp8 diffusers +compile+fp8 all +compile-full \
  mem:offload-model mem:offload-group
cp "$WORK"/bench/bench.{json,md,png} "$OUT"/ 2>/dev/null

# 3b. CUDA graphs (issue 42): step time and host time per step at the headline size, regional compile
#     without and with them, then the whole-model compile with (its default) and without. Rows go to
#     log.txt (the 8 files are taken); each setting compiles afresh, so later ones may be cut.
step "cuda graphs" 150 python3 "$REPO/benchmarks/cuda_graphs.py" --model "$MODEL" --size 1440x512 --steps 8 \
  --out "$WORK/cuda-graphs.json"

# 4. Cold then warm start: two fresh processes, each with an empty Inductor cache of its own, so the
#    second can only be warm through the artifacts the first saved. Check sizes count recompiles.
for run in cold warm; do
  step "warmup $run" 60 env TORCHINDUCTOR_CACHE_DIR="$WORK/inductor-$run" "${CLI[@]}" warmup --model "$MODEL" \
    --sizes 1024x1024 --check-sizes 1440x512 768x1024 --cache-dir "$WORK/compile-cache" --out "$OUT/warmup-$run.json"
done
echo "== done in $((SECONDS - START))s; files in $OUT" >>"$LOG"
tail -n 3 "$LOG"
