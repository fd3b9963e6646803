#!/usr/bin/env bash
# GPU check (issue 7, item 7): the CUDA test subset and the GPU benchmarks, one JSON line per step on stdout.
#
#   bash bench/gpu_check.sh             # on a GPU machine: < 8 min on one H100
#   bash bench/gpu_check.sh --dry-run   # anywhere: without CUDA, runs the CPU-runnable parts at toy size
#
# Steps: wheels -> nvidia-smi -> versions/imports -> pytest -m cuda tests/test_cuda.py (+ other cuda-marked tests)
# -> bench.step_cost r50 bs128 fp16 / bf16 channels-last -> bench.modules --amp -> bench/data_throughput.py
# -> bench.profile_step (torch.profiler of the CFSM step) -> summary. Each step's full output goes to
# $GPU_CHECK_DIR/gpu_check.log (default: $OUT/gpu_check when $OUT is set, else /tmp/gpu_check); the JSON lines are
# also written to gpu_check.jsonl there. Set GPU_CHECK_TRACE=1 to also keep a Chrome trace of the profiled steps.
#
# Wheels that must travel: the GPU machine has no network. Its image has torch, torchvision, opencv, scikit-learn,
# tensorboard and tqdm, but not easydict (configs/loader.py needs it). On a networked machine, in the repo root:
#     python3 -m pip download --no-deps --only-binary=:all: -d wheels easydict==1.14
# and let `wheels/` (or `.whl/`) travel with the tree; this script installs every wheel found there into
# /tmp/gpu_check_site and prepends it to PYTHONPATH. TensorBoard is optional: the CUDA tests run tensorboard=False.
#
# Exit status: 0 when every step that ran passed (also without a GPU: then it says "no CUDA device" and stops, or
# with --dry-run runs the CPU parts); 1 when a step failed.
set -euo pipefail

cd "$(dirname "$0")/.."
DRY_RUN=0
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY_RUN=1 ;;
        -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
        *) echo "unknown argument: $arg (use --dry-run or --help)" >&2; exit 2 ;;
    esac
done

PY="${PYTHON:-$(command -v python3 || command -v python)}"
LOG_DIR="${GPU_CHECK_DIR:-${OUT:+$OUT/gpu_check}}"
LOG_DIR="${LOG_DIR:-/tmp/gpu_check}"
BUDGET_S="${GPU_CHECK_BUDGET_S:-450}"  # stop starting steps after this: the whole check must end within 8 min
mkdir -p "$LOG_DIR"
LOG="$LOG_DIR/gpu_check.log"
JSONL="$LOG_DIR/gpu_check.jsonl"
: >"$LOG"
: >"$JSONL"
export PYTHONUNBUFFERED=1
FAILED=()

# emit STEP STATUS SECONDS [OUTPUT_FILE] [EXTRA_JSON]: one JSON line; the step's own last JSON line (the benchmarks
# print one) is embedded as "result", otherwise its last output line as "last_line" so a failure explains itself.
emit() {
    "$PY" - "$@" <<'PYEOF' | tee -a "$JSONL"
import json, sys
step, status, seconds = sys.argv[1:4]
out = sys.argv[4] if len(sys.argv) > 4 and sys.argv[4] else None
extra = json.loads(sys.argv[5]) if len(sys.argv) > 5 and sys.argv[5] else {}
line = {"step": step, "status": status, "seconds": float(seconds), **extra}
if out:
    lines = [l.strip() for l in open(out, errors="replace").read().splitlines() if l.strip()]
    result = None
    for l in reversed(lines):
        if l.startswith("{") and l.endswith("}"):
            try:
                result = json.loads(l)
                break
            except ValueError:
                pass
    if result is not None:
        line["result"] = result
    elif lines:
        line["last_line"] = lines[-1][-400:]
    if status != "ok":
        line["tail"] = lines[-15:]
print(json.dumps(line), flush=True)
PYEOF
}

# run STEP TIMEOUT_S CMD...: runs CMD with a time limit, logs its output, emits the JSON line, records failures.
run() {
    local step="$1" limit="$2"
    shift 2
    if (( SECONDS >= BUDGET_S )); then
        emit "$step" "skipped: time budget ${BUDGET_S}s spent" 0
        FAILED+=("$step")
        return 0
    fi
    local out rc start
    out="$(mktemp)"
    start=$SECONDS
    echo "===== $step: $*" >>"$LOG"
    if timeout --kill-after=10 "$limit" "$@" >"$out" 2>&1; then rc=0; else rc=$?; fi
    cat "$out" >>"$LOG"
    if (( rc == 0 )); then
        emit "$step" ok $((SECONDS - start)) "$out"
    else
        local why="failed (exit $rc)"
        (( rc == 124 || rc == 137 )) && why="timed out after ${limit}s"
        emit "$step" "$why" $((SECONDS - start)) "$out"
        FAILED+=("$step")
    fi
    rm -f "$out"
}

# ---- wheels carried in for the offline GPU machine ----
WHEELS=""
for d in wheels .whl; do
    if compgen -G "$d/*.whl" >/dev/null; then WHEELS="$d"; break; fi
done
if [[ -n "$WHEELS" ]]; then
    run wheels 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/gpu_check_site "$WHEELS"/*.whl
    export PYTHONPATH="/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}"
else
    emit wheels "none: no wheels/ or .whl/ folder" 0
fi

# ---- the machine ----
if command -v nvidia-smi >/dev/null 2>&1; then
    run nvidia_smi 30 nvidia-smi --query-gpu=name,memory.total --format=csv
else
    emit nvidia_smi "skipped: nvidia-smi not found" 0
fi

VERSIONS="$(mktemp)"
# Imports the training code needs; a missing one is named here instead of failing deep inside a test.
"$PY" - >"$VERSIONS" 2>&1 <<'PYEOF' || true
import importlib, json, platform
import torch
info = {"python": platform.python_version(), "torch": torch.__version__, "cuda_build": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cuda_available": torch.cuda.is_available(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "device_count": torch.cuda.device_count(),
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else None}
missing = []
for name in ("easydict", "cv2", "sklearn", "tqdm", "torchvision", "tensorboard", "pytest"):
    try:
        mod = importlib.import_module(name)
        info[name] = getattr(mod, "__version__", "present")
    except Exception:
        missing.append(name)
info["missing_imports"] = missing
try:
    import cv2
    info["cv2_has_IMREAD_COLOR_RGB"] = hasattr(cv2, "IMREAD_COLOR_RGB")  # dataset.py decodes straight to RGB
except Exception:
    pass
print(json.dumps(info))
PYEOF
cat "$VERSIONS" >>"$LOG"
emit versions ok 0 "$VERSIONS"
HAS_CUDA="$("$PY" -c 'import json,sys; print(int(json.loads(open(sys.argv[1]).read().splitlines()[-1])["cuda_available"]))' \
    "$VERSIONS" 2>/dev/null || echo 0)"
MISSING="$("$PY" -c 'import json,sys; print(" ".join(json.loads(open(sys.argv[1]).read().splitlines()[-1])["missing_imports"]))' \
    "$VERSIONS" 2>/dev/null || echo "?")"
rm -f "$VERSIONS"
if [[ "$MISSING" == *easydict* ]]; then
    emit deps "missing easydict: carry its wheel (see the top of bench/gpu_check.sh)" 0
    FAILED+=(deps)
fi

if [[ "$HAS_CUDA" != 1 ]]; then
    emit cuda "no CUDA device" 0 "" '{"cuda_available": false, "note": "torch.cuda.is_available() is False"}'
    if (( ! DRY_RUN )); then
        emit summary ok "$SECONDS" "" '{"mode": "no-gpu", "ran": "environment checks only; use --dry-run for the CPU parts"}'
        exit 0
    fi
fi

# ---- data for the throughput benchmark: a fresh small toy set (data/ does not travel) ----
# the CPU dry run still needs 2 full batches of 128 (data_throughput.py: fixed batch, the first is warm-up)
if (( HAS_CUDA )); then TOY_IDS=100; TOY_IMGS=20; else TOY_IDS=16; TOY_IMGS=17; fi
TOY="${TMPDIR:-/tmp}/gpu_check_toy_${TOY_IDS}x${TOY_IMGS}"  # sized name: an existing set is reused as is
run toy_data 120 "$PY" -m tools.make_toy_data --out "$TOY" --num-identities "$TOY_IDS" \
    --images-per-identity "$TOY_IMGS" --num-eval-identities 10 --num-pairs 20 --num-target-faces 20

if (( HAS_CUDA )); then
    run pytest_cuda 240 "$PY" -m pytest -m cuda -q -rs -p no:cacheprovider tests/test_cuda.py
    # the other files' cuda-marked tests (prefetcher, generator fp16): cheap, and they only run on a GPU
    run pytest_cuda_other 90 "$PY" -m pytest -m cuda -q -rs -p no:cacheprovider tests --ignore=tests/test_cuda.py
    run step_cost_fp16 90 "$PY" -m bench.step_cost --network r50 --batch-size 128 --amp fp16 --channels-last --reps 10
    run step_cost_bf16 90 "$PY" -m bench.step_cost --network r50 --batch-size 128 --amp bf16 --channels-last --reps 10
    # batch 64: at the module default of 4 a GPU measures launch latency, not per-image cost
    run modules 60 "$PY" -m bench.modules --device cuda --amp --batch-size 64 --reps 10
    run data_throughput 60 "$PY" bench/data_throughput.py --rec "$TOY" --max-workers 8 --images 2000 --repeats 2
    TRACE_ARGS=()
    [[ "${GPU_CHECK_TRACE:-0}" == 1 ]] && TRACE_ARGS=(--trace "$LOG_DIR/cfsm_step_trace.json")
    run profile_cfsm_step 90 "$PY" -m bench.profile_step --network r50 --batch-size 128 --amp fp16 \
        --channels-last --steps 3 "${TRACE_ARGS[@]}"
else
    # --dry-run without CUDA: the same entry points at toy size on the CPU, to prove the script and flags work
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
    run pytest_cuda 120 "$PY" -m pytest -m cuda -q -rs -p no:cacheprovider tests/test_cuda.py
    run step_cost_cpu 120 "$PY" -m bench.step_cost --network r_tiny --batch-size 8 --reps 2 --gen-dim 16 \
        --device cpu --threads 1
    run modules_cpu 120 "$PY" -m bench.modules --device cpu --batch-size 2 --reps 1
    run data_throughput_cpu 60 "$PY" bench/data_throughput.py --rec "$TOY" --max-workers 1 --images 64 --repeats 1
    run profile_cfsm_step_cpu 60 "$PY" -m bench.profile_step --network r_tiny --batch-size 8 --gen-dim 16 \
        --device cpu --warmup 1 --steps 2 --top 15
fi

MODE=gpu
(( HAS_CUDA )) || MODE=dry-run-cpu
FAILED_JSON="$("$PY" -c 'import json,sys; print(json.dumps(sys.argv[1:]))' "${FAILED[@]+"${FAILED[@]}"}")"
if (( ${#FAILED[@]} )); then
    emit summary failed "$SECONDS" "" "{\"mode\": \"$MODE\", \"failed\": $FAILED_JSON, \"log\": \"$LOG\"}"
    exit 1
fi
emit summary ok "$SECONDS" "" "{\"mode\": \"$MODE\", \"failed\": [], \"log\": \"$LOG\"}"
