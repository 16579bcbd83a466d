#!/usr/bin/env bash
# The one-shot GPU check (issue 11): one run of about 6 minutes on an H200 (Python 3.12,
# torch 2.11, Triton 3.6, nvcc 13) that builds, tests, gates, times, profiles and
# sanitizes, and leaves its results in OUT_DIR even when it is killed part-way.
#
#   bench/gpu_check.sh OUT_DIR          # on the GPU machine (make gpu-check)
#   bench/gpu_check.sh OUT_DIR --dry    # on a CPU: the same plan at tiny shapes (CI runs it)
#
# The plan (s from the start; each step under its own time limit, GPU defaults; steps on
# one line run side by side):
#   0     env            versions, device, tools                                     30
#   ~10   build      bg  lift_kernels._C with CUDA, sm_90a only                      T_BUILD=120
#         prewarm    bg  PREWARM processes compile every Triton autotuning
#                        configuration at the gate's shapes into Triton's disk cache T_PREWARM=120
#         triton_tests   a curated GPU subset of tests/test_triton.py, pytest -n     T_TESTS=90
#   ~130  cuda_tests bg  tests/test_cuda.py, pytest -n                               T_CUDA_TESTS=50
#         memcheck,  bg  compute-sanitizer on the cuda backend (forward and the      T_SANITIZER=40
#         racecheck,     three backward kernels) at tiny shapes
#         synccheck
#   ~180  measure        one process with the GPU to itself (bench/gpu_check.py):    T_MEASURE=170
#                        the correctness gate at the benchmark shape, B=4 Hq=32 Hkv=8
#                        D=128 bf16, N=4096 and 16384 (triton, cuda vs a float32 run,
#                        output, gate, all ten gradients; `cuda` in a child process; a
#                        backend that fails is not timed), timing at N=16384 then 4096
#                        (SDPA flash, cuDNN, torch, triton, cuda; CUDA events), registers
#                        and spills of the loaded Triton kernels, one torch.profiler pass
#                        per fused backend
#   ~350  pack           the summary, printed last
#
# OUT_DIR holds three files, replaced after every step (so a kill leaves the last set):
#   summary.md  summary.json  gpu_check.tar.gz (every log and JSON of the work folder)
# Environment: PYTHON (python3), JOBS (build jobs, default nproc), XDIST (pytest workers, 6),
# PREWARM (prewarm processes, 4), GC_WORK (work folder, default a fresh temporary one),
# TRITON_CACHE_DIR (default build/gpu_check/triton-cache), the T_* limits above.
# Exit status 0 when every step passed, 1 otherwise, 2 for bad usage.

set -uo pipefail

if [ $# -lt 1 ] || [ "${1#-}" != "$1" ] || { [ $# -ge 2 ] && [ "$2" != "--dry" ]; }; then
  echo "usage: $0 OUT_DIR [--dry]" >&2
  exit 2
fi
OUT=$(mkdir -p "$1" && cd "$1" && pwd) || { echo "cannot create $1" >&2; exit 2; }
DRY=0
[ "${2:-}" = "--dry" ] && DRY=1
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 2
PY=${PYTHON:-python3}
WORK=${GC_WORK:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")}
mkdir -p "$WORK" || exit 2
export PY WORK OUT ROOT PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$ROOT/build/gpu_check/triton-cache}
mkdir -p "$TRITON_CACHE_DIR"
JOBS=${JOBS:-$(nproc)}
PREWARM=${PREWARM:-4}
XDIST=${XDIST:-6}

# The Triton tests worth a GPU's time: the GPU-only shapes, bf16/fp16 with biases and
# float32 weights, a non-power-of-two head dim, decoding, MQA, no RoPE, custom scales,
# deterministic mode, rows that see no key, strides, 64-bit offsets (about 16 tests).
TRITON_K="gpu- or bf16-bias or fp16-fp32-weights or decode-nq1 or mqa-4 or non-causal-nq \
or scales or deterministic or no_key or strides or past_2"

if [ $DRY -eq 1 ]; then
  DRYFLAG=--dry
  # The interpreter runs the Triton kernels; one thread keeps forked timing children safe.
  export TRITON_INTERPRET=1 OMP_NUM_THREADS=1
  # Generous limits: the dry run proves the plan, it does not time it (a CPU shared with
  # other jobs can take minutes to import torch in several processes at once).
  T_BUILD=${T_BUILD:-150} T_PREWARM=${T_PREWARM:-150} T_TESTS=${T_TESTS:-150}
  T_CUDA_TESTS=${T_CUDA_TESTS:-150} T_SANITIZER=${T_SANITIZER:-150} T_MEASURE=${T_MEASURE:-300}
  PREWARM=2 XDIST=2
  MEASURE_BUDGETS=(--gate-s 120 --timing-s 120 --profile-s 60)
else
  DRYFLAG=
  T_BUILD=${T_BUILD:-120} T_PREWARM=${T_PREWARM:-120} T_TESTS=${T_TESTS:-90}
  T_CUDA_TESTS=${T_CUDA_TESTS:-50} T_SANITIZER=${T_SANITIZER:-40} T_MEASURE=${T_MEASURE:-170}
  MEASURE_BUDGETS=(--gate-s 65 --timing-s 50 --profile-s 20)
fi
export DRYFLAG JOBS PREWARM

declare -A PID STARTED LIMIT

# One line per step in phases.jsonl (the measure process adds its own).
record() {
  printf '{"phase": "%s", "status": "%s", "seconds": %s, "note": "%s"}\n' \
    "$1" "${2//\"/\'}" "$3" "${4:-}" >>"$WORK/phases.jsonl"
}

pack() {
  "$PY" bench/gpu_check.py pack "$WORK" "$OUT" >>"$WORK/pack.log" 2>&1 \
    || echo "[gpu_check] pack failed: see $WORK/pack.log"
}

# start NAME LIMIT_S LOG COMMAND...: runs COMMAND in the background under its time limit
# (timeout kills its whole process group), output appended to LOG.
start() {
  local name=$1 limit=$2 log=$3
  shift 3
  echo "=== $name $(date -u +%H:%M:%S) (limit ${limit}s): $*" >>"$log"
  timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1 &
  PID[$name]=$! STARTED[$name]=$SECONDS LIMIT[$name]=$limit
}

# finish NAME [NOTE]: waits for the step, records it, refreshes OUT; fails if the step did.
finish() {
  local name=$1 note=${2:-} rc status
  wait "${PID[$name]}"
  rc=$?
  unset "PID[$name]"
  case $rc in
    0) status=ok ;;
    124|137) status="TIMED OUT after ${LIMIT[$name]}s" ;;
    *) status="FAILED rc=$rc" ;;
  esac
  record "$name" "$status" $((SECONDS - STARTED[$name])) "$note"
  echo "[gpu_check $(date -u +%H:%M:%S) +${SECONDS}s] $name: $status" \
       "($((SECONDS - STARTED[$name])) s)${note:+; $note}"
  pack
  [ $rc -eq 0 ]
}

step() { start "$@"; finish "$1"; }

# A kill of this script stops every step still running (timeout passes the signal on).
trap 'for p in "${PID[@]}"; do kill "$p" 2>/dev/null; done; pack; exit 143' TERM INT

echo "[gpu_check] $(date -u '+%Y-%m-%d %H:%M:%S UTC') dry=$DRY work=$WORK out=$OUT"

# --- env
step env 30 "$WORK/env.log" bash -c '
  git log -1 --format="commit %H %s" 2>/dev/null || echo "not a git checkout"
  git status --short 2>/dev/null | head -20
  nvidia-smi 2>&1 || echo "nvidia-smi: not available"
  nvcc --version 2>&1 | tail -2 || echo "nvcc: not available"
  compute-sanitizer --version 2>&1 | head -3 || echo "compute-sanitizer: not available"
  "$PY" bench/gpu_check.py env "$WORK" $DRYFLAG'

# --- build, prewarm and the Triton tests side by side
if [ $DRY -eq 1 ]; then
  # A rebuild with other options would replace the _C that `make build` made (CI's tests
  # of the build run after this one): only the import is checked.
  start build "$T_BUILD" "$WORK/build.log" bash -c '
    echo "dry: _C not rebuilt; on the GPU: LIFT_KERNELS_CUDA=1 LIFT_KERNELS_CUDA_ARCHS=90a \
MAX_JOBS=$JOBS $PY setup.py build_ext --inplace"
    "$PY" -c "import lift_kernels; print(\"build_info\", lift_kernels.build_info())"'
else
  start build "$T_BUILD" "$WORK/build.log" bash -c '
    set -e
    LIFT_KERNELS_CUDA=1 LIFT_KERNELS_CUDA_ARCHS=90a MAX_JOBS=$JOBS \
      "$PY" setup.py build_ext --inplace
    so=$(ls lift_kernels/_C*.so | head -1)
    if command -v cuobjdump >/dev/null; then
      cuobjdump --dump-resource-usage "$so" >"$WORK/cuda_resources.txt" 2>&1 || true
    fi
    "$PY" -c "import lift_kernels; print(\"build_info\", lift_kernels.build_info())"'
fi
start prewarm "$T_PREWARM" "$WORK/prewarm.log" bash -c '
  pids=()
  for i in $(seq 0 $((PREWARM - 1))); do
    "$PY" bench/gpu_check.py prewarm --worker "$i" --workers "$PREWARM" $DRYFLAG &
    pids+=($!)
  done
  rc=0
  for p in "${pids[@]}"; do wait "$p" || rc=1; done
  exit $rc'

XDIST_ARGS=() CUDA_XDIST_ARGS=()
if "$PY" -c "import xdist" 2>/dev/null; then
  XDIST_ARGS=(-n "$XDIST") CUDA_XDIST_ARGS=(-n 4)
else
  echo "pytest-xdist not importable: the tests run in one process" >>"$WORK/triton_tests.log"
fi
PYTEST=("$PY" -m pytest -q -rfEs -p no:cacheprovider --color=no)
if [ $DRY -eq 1 ]; then
  # Collect the GPU selection exactly as the GPU run does (the interpreter runs of these
  # tests are make test's): proves the files import and the selection is not empty.
  step triton_tests "$T_TESTS" "$WORK/triton_tests.log" env -u TRITON_INTERPRET \
    LIFT_TEST_DEVICE=cuda "${PYTEST[@]}" --collect-only tests/test_triton.py -k "$TRITON_K"
else
  # Correctness needs no tuning: one configuration per kernel (each test shape would
  # otherwise compile them all).
  step triton_tests "$T_TESTS" "$WORK/triton_tests.log" env LIFT_TEST_DEVICE=cuda \
    LIFT_KERNELS_TRITON_CONFIGS=1 "${PYTEST[@]}" "${XDIST_ARGS[@]}" tests/test_triton.py \
    -k "$TRITON_K"
fi
finish build

# --- the CUDA tests and compute-sanitizer side by side (none of them times anything)
if [ $DRY -eq 1 ]; then
  start cuda_tests "$T_CUDA_TESTS" "$WORK/cuda_tests.log" env -u TRITON_INTERPRET \
    LIFT_TEST_DEVICE=cuda "${PYTEST[@]}" --collect-only tests/test_cuda.py
  for tool in memcheck racecheck synccheck; do
    start "$tool" "$T_SANITIZER" "$WORK/$tool.log" bash -c "
      echo 'dry: compute-sanitizer --tool $tool not run; the program it wraps runs alone:'
      \"\$PY\" bench/gpu_check.py sanitize-target --dry"
  done
else
  start cuda_tests "$T_CUDA_TESTS" "$WORK/cuda_tests.log" env LIFT_TEST_DEVICE=cuda \
    LIFT_KERNELS_TRITON_CONFIGS=1 "${PYTEST[@]}" "${CUDA_XDIST_ARGS[@]}" tests/test_cuda.py
  for tool in memcheck racecheck synccheck; do
    if command -v compute-sanitizer >/dev/null; then
      start "$tool" "$T_SANITIZER" "$WORK/$tool.log" compute-sanitizer --tool "$tool" \
        --error-exitcode 17 --print-limit 20 "$PY" bench/gpu_check.py sanitize-target
    else
      start "$tool" 5 "$WORK/$tool.log" bash -c 'echo "compute-sanitizer: not on PATH"; exit 3'
    fi
  done
fi
finish cuda_tests
finish memcheck
finish racecheck
finish synccheck

# Without the prewarmed binaries the gate would compile every configuration one after
# another (minutes): then autotuning gets the first few only, and the summary says so.
if ! finish prewarm; then
  export LIFT_KERNELS_TRITON_CONFIGS=${LIFT_KERNELS_TRITON_CONFIGS:-4}
  record prewarm-fallback "LIFT_KERNELS_TRITON_CONFIGS=$LIFT_KERNELS_TRITON_CONFIGS" 0
fi

# --- the GPU-exclusive phases
step measure "$T_MEASURE" "$WORK/measure.log" "$PY" bench/gpu_check.py measure "$WORK" "$OUT" \
  $DRYFLAG "${MEASURE_BUDGETS[@]}"

pack
echo "[gpu_check] done in ${SECONDS}s; $OUT: summary.md summary.json gpu_check.tar.gz"
cat "$OUT/summary.md"
if grep -v '"status": "ok"' "$WORK/phases.jsonl" | grep -q .; then
  exit 1
fi
exit 0
