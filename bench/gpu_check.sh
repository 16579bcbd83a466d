#!/usr/bin/env bash
# The one-shot GPU check (H200): build for sm_90a, run every GPU test, the GPU benchmark
# sweep and the end-to-end LIFT step, write everything into OUT_DIR, print a summary last.
#
#   bench/gpu_check.sh OUT_DIR          # on the GPU machine, from anywhere
#   bench/gpu_check.sh OUT_DIR --dry    # on a CPU machine: the same steps at smoke sizes
#
# Needs python3 with torch, triton, transformers (and pytest for the tests; matplotlib for
# the plot, else it is skipped), pybind11, cmake, ninja and nvcc.  No network, no installs.
# Each step has its own time limit and a failing step does not stop the next; the whole
# script stays within about 8 minutes, plus up to 4 x T_CUDA for the cuda checks.  OUT_DIR
# gets at most 8 files, none in subfolders:
#   build.log  tests.log  bench.log  bench.json  bench.csv  bench.png  lift_step.json  summary.txt
# Time limits (seconds) can be changed through the environment: T_BUILD T_TESTS T_BENCH T_LIFT
# T_CUDA (each cuda_check / compute-sanitizer step).

set -uo pipefail

if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
  echo "usage: $0 OUT_DIR [--dry]" >&2
  exit 2
fi
OUT=$(mkdir -p "$1" && cd "$1" && pwd) || { echo "cannot create $1" >&2; exit 2; }
DRY=0
[ "${2:-}" = "--dry" ] && DRY=1
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 2
PY=${PYTHON:-python3}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
T_BUILD=${T_BUILD:-120} T_TESTS=${T_TESTS:-140} T_BENCH=${T_BENCH:-130} T_LIFT=${T_LIFT:-80}
SUMMARY=()

# step NAME LIMIT_S LOG COMMAND...: runs COMMAND under a time limit, appends to LOG.
step() {
  local name=$1 limit=$2 log=$3
  shift 3
  local start=$SECONDS rc
  echo "=== $name ($(date -u +%H:%M:%S), limit ${limit}s): $*" | tee -a "$log"
  timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1
  rc=$?
  local status=ok
  [ $rc -ne 0 ] && status="FAILED rc=$rc"
  [ $rc -eq 124 ] || [ $rc -eq 137 ] && status="TIMED OUT after ${limit}s"
  echo "=== $name: $status in $((SECONDS - start))s" | tee -a "$log"
  SUMMARY+=("$(printf '%-10s %-24s %4ss' "$name" "$status" $((SECONDS - start)))")
}

# 1. Machine, versions, build for sm_90a.
{
  echo "gpu_check $(date -u '+%Y-%m-%d %H:%M:%S UTC'), dry=$DRY, root $ROOT"
  git -C "$ROOT" log -1 --format='commit %H %s' 2>/dev/null || echo "commit: not a git checkout"
  nvidia-smi 2>&1 || echo "nvidia-smi: not available"
  nvcc --version 2>&1 | tail -2 || echo "nvcc: not available"
  "$PY" - <<'EOF'
import importlib, platform
print("python", platform.python_version())
for name in ("torch", "triton", "transformers", "pybind11", "cmake", "ninja", "pytest",
             "matplotlib"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as err:
        print(name, "missing:", type(err).__name__)
import torch
print("torch.version.cuda", torch.version.cuda, "| cuda available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, f"cc {p.major}.{p.minor}", f"{p.total_memory / 2**30:.1f} GiB",
          f"{p.multi_processor_count} SMs")
EOF
} >"$OUT/build.log" 2>&1

if [ $DRY -eq 1 ]; then
  step build "$T_BUILD" "$OUT/build.log" env LIFT_KERNELS_CUDA=0 "$PY" setup.py build_ext --inplace
else
  step build "$T_BUILD" "$OUT/build.log" env LIFT_KERNELS_CUDA=1 LIFT_KERNELS_CUDA_ARCHS=90a \
    MAX_JOBS="$(nproc)" "$PY" setup.py build_ext --inplace
fi
step extension 30 "$OUT/build.log" "$PY" -c "import lift_kernels; print('build_info', lift_kernels.build_info()); print('backends cuda', lift_kernels.available_backends('cuda') if __import__('torch').cuda.is_available() else '-', 'cpu', lift_kernels.available_backends('cpu'))"
if command -v cuobjdump >/dev/null && [ $DRY -eq 0 ]; then
  so=$(ls lift_kernels/_C*.so 2>/dev/null | head -1)
  [ -n "$so" ] && step cuobjdump 30 "$OUT/build.log" cuobjdump --list-elf "$so"
fi

# 2. Every GPU test that exists (Triton and CUDA backends against the reference).
# The GPU test files (test_triton_compile.py is left out: on a GPU the real tests compile
# the same kernels; test_cext.py is CPU-only and checks an sm_80 + sm_90a build).
tests=$(ls tests/test_triton.py tests/test_cuda*.py 2>/dev/null | tr '\n' ' ')
if [ -z "$tests" ]; then
  echo "no GPU test files (tests/test_triton.py, test_cuda*.py)" >"$OUT/tests.log"
  SUMMARY+=("$(printf '%-10s %-24s %4ss' tests 'none found' 0)")
elif [ $DRY -eq 1 ]; then
  step tests "$T_TESTS" "$OUT/tests.log" "$PY" -m pytest -q --collect-only $tests
else
  # Correctness needs no tuning: one Triton configuration per kernel (else every test shape
  # would compile every configuration).
  step tests "$T_TESTS" "$OUT/tests.log" env LIFT_TEST_DEVICE=cuda LIFT_KERNELS_TRITON_CONFIGS=1 \
    "$PY" -m pytest -q -rfEs $tests
fi

# 2b. The cuda backend: correctness gate at the benchmark shape against the torch backend,
# then compute-sanitizer (memcheck, racecheck, synccheck) on a small shape.  Logged with the
# tests.
if [ $DRY -eq 0 ]; then
  step cuda_gate "${T_CUDA:-60}" "$OUT/tests.log" "$PY" bench/cuda_check.py
  if command -v compute-sanitizer >/dev/null; then
    for tool in memcheck racecheck synccheck; do
      step "$tool" "${T_CUDA:-60}" "$OUT/tests.log" compute-sanitizer --tool "$tool" \
        --error-exitcode 1 "$PY" bench/cuda_check.py --tiny
    done
  else
    echo "compute-sanitizer: not on PATH, skipped" >>"$OUT/tests.log"
  fi
fi

if [ $DRY -eq 1 ]; then
  bench_args=(--device cpu --sweep smoke --threads 1 --warmup 0 --repeats 2 --min-repeats 1
              --target-ms 1)
else
  bench_args=(--device cuda --sweep gpu-target --n 4096,16384,8192 --warmup 2 --repeats 20
              --target-ms 200)
fi
# Autotuning over the first 4 configurations per kernel keeps compilation inside the limit.
step bench "$T_BENCH" "$OUT/bench.log" env LIFT_KERNELS_TRITON_CONFIGS=4 "$PY" bench/kernels.py "${bench_args[@]}" \
  --time-budget $((T_BENCH - 45)) --json "$OUT/bench.json" --csv "$OUT/bench.csv" \
  --plot "$OUT/bench.png"

# 4. End-to-end LIFT step: Llama-3-8B shapes, bf16, 2048-token segments; 8k-token absorb.
if [ $DRY -eq 1 ]; then
  lift_args=(--device cpu --smoke --threads 1)
else
  lift_args=(--device cuda --model llama3-8b --seq 2048 --warmup 1 --steps 3)
fi
step lift_step "$T_LIFT" "$OUT/bench.log" "$PY" bench/lift_step.py "${lift_args[@]}" \
  --json "$OUT/lift_step.json"

# 5. Summary (stdlib only): steps, then the headline figures from the JSON files.
{
  echo
  echo "=== gpu_check summary ($(date -u '+%Y-%m-%d %H:%M UTC'), ${SECONDS}s, dry=$DRY)"
  printf '%s\n' "${SUMMARY[@]}"
  "$PY" - "$OUT" <<'EOF'
import json, os, sys
out = sys.argv[1]
def load(name):
    try:
        with open(os.path.join(out, name)) as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        print(f"{name}: not written ({type(err).__name__})")
        return None
bench = load("bench.json")
if bench:
    env = bench["environment"]
    print(f"kernels: {env['device_name']}, torch {env['torch']}, triton {env['triton']}")
    print(f"{'backend':<10} {'N':>6} {'fwd ms':>8} {'f+b ms':>8} {'fwd TF/s':>9} "
          f"{'x ref':>6} {'x torch':>7} {'t/sdpa':>6} {'m/sdpa':>6}")
    rows = {}
    for r in bench["rows"]:
        rows.setdefault((r["backend"], r["Nq"], r["D"], r["dtype"]), {})[r["pass"]] = r
    fmt = lambda x, s=".2f": "-" if x is None else format(x, s)
    for (name, n, d, dtype), r in rows.items():
        f, fb = r["fwd"], r["fwd_bwd"]
        if f["status"] != "ok":
            print(f"{name:<10} {n:>6} {f['status']}: {f['note'][:70]}")
            continue
        print(f"{name:<10} {n:>6} {f['ms']:>8.2f} {fb['ms']:>8.2f} {fmt(f['tflops'], '.3g'):>9} "
              f"{fmt(fb['speedup_vs_reference']):>6} {fmt(fb['speedup_vs_torch']):>7} "
              f"{fmt(fb['time_over_sdpa']):>6} {fmt(fb['mem_over_sdpa']):>6}")
lift = load("lift_step.json")
if lift:
    a = lift["args"]
    print(f"LIFT step: {a['model']} {a['dtype']}, {a['seq']}-token segments, "
          f"absorb {a['doc_tokens']} tokens with the default recipe")
    for r in lift["rows"]:
        if r["status"] != "ok":
            print(f"  {r['backend']:<10} {r['status']}: {r.get('note', '')[:70]}")
            continue
        ref = r["speedup_vs_reference"]
        print(f"  {r['backend']:<10} step {r['segment_step_ms']:8.1f} ms  "
              f"{r['tokens_per_s']:8.0f} tok/s  peak {r['peak_bytes'] / 2**30:6.1f} GiB  "
              f"absorb {r['absorb_s']:7.2f} s  x ref {'-' if ref is None else format(ref, '.2f')}")
EOF
} 2>&1 | tee "$OUT/summary.txt"
