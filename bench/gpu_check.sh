#!/usr/bin/env bash
# The project's GPU check: one command from the project root on a CUDA machine, under 8 minutes.
#
#   bash bench/gpu_check.sh          # results under $OUT if set, else ./gpu_out
#
# Steps, each under its own timeout and all inside CHECK_BUDGET_S (default 450 s); whatever fails,
# the last lines are a summary (step status, then the figures that came back):
#   env      GPU, driver, nvcc, torch / triton versions (read-only queries)
#   build    editable build of attrspace._C for this GPU's architecture, then nvcc -Xptxas -v of the
#            CUDA kernels (registers, spills, shared memory)
#   smoke    every backend once at the target shape against attrspace.adapters.reference (bench/gpu_check.py),
#            each in its own process under a short timeout, so a hanging kernel costs one step only
#   tests    the backend tests on the GPU (Triton, CUDA, torch backend, functional, backend choice)
#   timings  frozen nn.Linear, SubspaceLinear on every backend, LoRA r=16 (ours, peft's): fwd+bwd
#            medians, ratios to frozen and to the work floor F, TFLOP/s against the measured matmul
#            ceiling, peak memory; and what `auto` measured and chose
#   ratio    bench/bench_ratio.py at 1024 -> 3072 (interleaved rounds, auto backend)
#   svd      batched randomized SVD against one call per matrix
# Knobs: CHECK_BUDGET_S, CHECK_T (tokens), CHECK_DTYPE, CHECK_SKIP="step step", PYTHON.

set -u -o pipefail
ROOT="$(pwd)"
OUT="${OUT:-$ROOT/gpu_out}"
PY="${PYTHON:-python3}"
BUDGET="${CHECK_BUDGET_S:-450}"
SKIP=" ${CHECK_SKIP:-} "
START=$(date +%s)
mkdir -p "$OUT"
LOG="$OUT/check.log"
: > "$LOG"
export PYTHONUNBUFFERED=1 XDG_CACHE_HOME="$OUT/cache" TRITON_CACHE_DIR="$OUT/cache/triton"
export PATH="$PATH:/usr/local/cuda/bin"
declare -A STATUS
STEPS=()

if [ ! -f "$ROOT/pyproject.toml" ] || [ ! -f "$ROOT/bench/gpu_check.py" ]; then
  echo "run from the attrspace project root (pyproject.toml, bench/gpu_check.py not in $ROOT)"
  exit 2
fi

log() { echo "$*" | tee -a "$LOG"; }

# step NAME LIMIT_S FUNCTION: run FUNCTION in a child bash under timeout min(LIMIT_S, budget left).
step() {
  local name=$1 limit=$2 fn=$3 left rc
  STEPS+=("$name")
  if [[ "$SKIP" == *" $name "* ]]; then STATUS[$name]="skipped (CHECK_SKIP)"; return 0; fi
  left=$(( BUDGET - ($(date +%s) - START) ))
  if (( left < 10 )); then STATUS[$name]="not run (budget spent)"; return 1; fi
  (( limit > left )) && limit=$left
  log "=== $name (limit ${limit}s)"
  local t0=$(date +%s)
  timeout --kill-after=5 "$limit" bash -c "set -o pipefail; $(declare -f "$fn"); $fn" \
    >> "$OUT/$name.log" 2>&1
  rc=$?
  local took=$(( $(date +%s) - t0 ))
  case $rc in
    0) STATUS[$name]="ok (${took}s)" ;;
    124|137) STATUS[$name]="TIMEOUT after ${took}s" ;;
    *) STATUS[$name]="FAILED rc=$rc (${took}s), see $name.log" ;;
  esac
  tail -n 5 "$OUT/$name.log" | tee -a "$LOG"
  return $rc
}

run_env() {
  nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv || true
  nvcc --version | tail -n 2 || true
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'triton', triton.__version__, 'device', torch.cuda.get_device_name(),
'capability', torch.cuda.get_device_capability())"
}

run_build() {
  local cap
  cap=$("$PY" -c "import torch; a, b = torch.cuda.get_device_capability(); print(f'{a}{b}')")
  ATTRSPACE_CUDA_ARCHS="$cap" "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . -q
  "$PY" -c "import attrspace._C as c; print(c.build_info())"
  nvcc -std=c++17 --expt-relaxed-constexpr -DNDEBUG -Icsrc "-arch=sm_$cap" -cubin -o /dev/null \
    -Xptxas -v --resource-usage csrc/subspace_linear.cu 2>&1 | grep -E "Function properties|spill|Used"
}

run_smoke() {
  local b rc=0
  for b in torch triton cuda; do
    timeout 60 "$PY" bench/gpu_check.py smoke "$b" "$OUT/smoke_$b.json" > "$OUT/smoke_$b.log" 2>&1
    local r=$?
    echo "smoke $b: rc=$r"; tail -n 3 "$OUT/smoke_$b.log"
    (( r != 0 )) && rc=$r
  done
  return $rc
}

run_tests() {
  "$PY" -m pytest -q -rfEs tests/kernels/test_subspace_linear.py tests/backends/test_cuda_backend.py tests/backends/test_torch_backend.py \
    tests/adapters/test_functional.py tests/backends/test_choice.py --junitxml="$OUT/tests.xml"
}

run_timings() { "$PY" bench/gpu_check.py timings "$OUT/timings.json"; }

run_ratio() {
  cd bench && "$PY" -m pytest -q bench_ratio.py -k 1024x3072 --benchmark-json="$OUT/bench_ratio.json" \
    && "$PY" report.py "$OUT/bench_ratio.json"
}

run_svd() { "$PY" bench/gpu_check.py svd "$OUT/svd.json"; }

export ROOT OUT PY
step env 30 run_env
step build 200 run_build
step smoke 120 run_smoke
step timings 120 run_timings
step ratio 90 run_ratio
step svd 60 run_svd
step tests 150 run_tests

{
  echo
  echo "===== gpu_check summary ($(( $(date +%s) - START ))s of ${BUDGET}s)"
  for s in "${STEPS[@]}"; do printf '%-8s %s\n' "$s" "${STATUS[$s]}"; done
  "$PY" - "$OUT" <<'PYEOF' || echo "(no figures could be read)"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
for f in sorted(out.glob("smoke_*.json")):
    r = json.loads(f.read_text())
    if "skipped" in r:
        print(f"smoke {r['backend']:<7} cannot run here: " + "; ".join(r["skipped"]))
        continue
    print(f"smoke {r['backend']:<7} max rel. error " + ", ".join(f"{k} {v:.1e}" for k, v in r["errors"].items()))
if (out / "timings.json").exists():
    t = json.loads((out / "timings.json").read_text())
    print(f"timings {t['device']} {t['dtype']} T,d_in,d_out,K={t['shape']} F={t['work_floor_F']:.3f} "
          f"matmul ceiling {t['matmul_ceiling_tflops']:.0f} TFLOP/s")
    for name, r in t["rows"].items():
        peak = f"{r['peak_bytes'] / 2**20:.0f} MiB" if r["peak_bytes"] is not None else "-"
        print(f"  {name:<26} {r['ms']:8.3f} ms  {r['x_frozen']:.3f}x frozen  "
              f"{r['x_frozen_over_F']:.3f}x F*frozen  {r['tflops_frozen_work']:.0f} TFLOP/s  peak {peak}")
    print(t["auto"])
if (out / "svd.json").exists():
    s = json.loads((out / "svd.json").read_text())
    print(f"svd {s['batch']} x {s['size']} rank {s['rank']}: batched {s['batched_ms']:.1f} ms, "
          f"loop {s['loop_ms']:.1f} ms, {s['speedup']:.1f}x")
PYEOF
} | tee "$OUT/summary.txt"
