#!/usr/bin/env bash
# The project's GPU check: one command from the project root on a CUDA machine, inside CHECK_BUDGET_S.
#
#   bash bench/gpu_check.sh              # results in $OUT if set, else ./gpu_out
#   CHECK_DRY_RUN=1 bash bench/gpu_check.sh   # the same steps on the CPU at tiny shapes (CI)
#
# What comes back is at most three files, none in a sub-folder (a lent GPU machine returns at most 8
# files, at most 2 folders deep):
#   summary.txt    step status, then the figures (also printed last, so a command's tail shows it)
#   results.json   every step's figures in one JSON object
#   logs.tar.gz    every step's full log
# Logs, the Triton cache and XDG caches live in a scratch folder outside $OUT ($CHECK_WORK, else a
# fresh mktemp -d), so nothing a compiler writes can push the results out.
#
# Steps, each under its own limit; the limits add up to at most the budget less RESERVE_S (the script
# refuses to start otherwise), so no step is dropped for lack of time:
#   env      GPU, driver, nvcc, torch / triton versions (read-only queries)
#   build    attrspace._C as a wheel for this GPU's architecture; if that fails, again without the CUDA
#            part (ATTRSPACE_CUDA=OFF), so attrspace and attrspace.kernels import either way; then
#            nvcc -Xptxas -v of the CUDA kernels (registers, spills, shared memory)
#   smoke    every backend once at the target shape against attrspace.reference (bench/gpu_check.py),
#            each in its own process, so a hanging kernel costs one backend only
#   timings  frozen nn.Linear, SubspaceLinear on every backend, LoRA r=16 (ours, peft's): fwd+bwd
#            timed with CUDA events over back-to-back steps and by CUDA-graph replay (Triton at
#            its first config, not autotuned)
#   svd      batched randomized SVD against one call per matrix
#   tests    the backend tests on the GPU, one Triton config per dtype (ATTRSPACE_TRITON_CONFIGS=one)
# Knobs: CHECK_BUDGET_S, CHECK_T (tokens), CHECK_DTYPE, CHECK_SKIP="step step", CHECK_WORK, PYTHON.

set -u -o pipefail
ROOT="$(pwd)"
OUT="${OUT:-$ROOT/gpu_out}"
PY="${PYTHON:-python3}"
BUDGET="${CHECK_BUDGET_S:-480}"
RESERVE_S=20 # the summary and the archive
DRY="${CHECK_DRY_RUN:-0}"
SKIP=" ${CHECK_SKIP:-} "
START=$(date +%s)

if [ ! -f "$ROOT/pyproject.toml" ] || [ ! -f "$ROOT/bench/gpu_check.py" ]; then
  echo "run from the attrspace project root (pyproject.toml, bench/gpu_check.py not in $ROOT)"
  exit 2
fi

# name:limit_s, in the order they run
PLAN=(env:20 build:150 smoke:60 timings:110 svd:40 tests:80)
total=0
for entry in "${PLAN[@]}"; do total=$(( total + ${entry#*:} )); done
if (( total + RESERVE_S > BUDGET )); then
  echo "step limits add up to ${total}s + ${RESERVE_S}s reserve, over CHECK_BUDGET_S=${BUDGET}s"
  exit 2
fi

WORK="${CHECK_WORK:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")}"
LOGS="$WORK/logs"
RESULTS="$WORK/results"
mkdir -p "$OUT" "$LOGS" "$RESULTS" "$WORK/cache"
export PYTHONUNBUFFERED=1 XDG_CACHE_HOME="$WORK/cache" TRITON_CACHE_DIR="$WORK/cache/triton"
# The tree's attrspace through a folder holding only a link to it: the project root itself on the path
# would shadow Hugging Face's `kernels` package (which peft imports) with the root's kernels/.
mkdir -p "$WORK/site" && ln -sfn "$ROOT/attrspace" "$WORK/site/attrspace"
export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}" PATH="$PATH:/usr/local/cuda/bin"
export ROOT PY RESULTS DRY WORK
if [ "$DRY" = 1 ]; then
  # CPU stand-ins: the torch backend at a tiny shape, the others report why they cannot run
  export CHECK_T="${CHECK_T:-8}" CHECK_DTYPE="${CHECK_DTYPE:-float32}" CHECK_SVD_BATCH=2
  export CHECK_SVD_SIZE=32 CHECK_ROUNDS=2 CUDA_VISIBLE_DEVICES=""
  unset TRITON_INTERPRET # the interpreter would take minutes at the target's width
fi
declare -A STATUS
STEPS=()

log() { echo "$*" | tee -a "$LOGS/check.log"; }

# step NAME LIMIT_S FUNCTION: run FUNCTION in a child bash under timeout LIMIT_S.
step() {
  local name=$1 limit=$2 fn=$3 rc t0 took
  STEPS+=("$name")
  if [[ "$SKIP" == *" $name "* ]]; then STATUS[$name]="skipped (CHECK_SKIP)"; return 0; fi
  log "=== $name (limit ${limit}s)"
  t0=$(date +%s)
  timeout --kill-after=5 "$limit" bash -c "set -o pipefail; $(declare -f); $fn" \
    >> "$LOGS/$name.log" 2>&1
  rc=$?
  took=$(( $(date +%s) - t0 ))
  case $rc in
    0) STATUS[$name]="ok (${took}s)" ;;
    124|137) STATUS[$name]="TIMEOUT after ${took}s" ;;
    *) STATUS[$name]="FAILED rc=$rc (${took}s), see logs.tar.gz:logs/$name.log" ;;
  esac
  tail -n 5 "$LOGS/$name.log" | tee -a "$LOGS/check.log"
  return $rc
}

run_env() {
  nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv || true
  nvcc --version | tail -n 2 || true
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'triton', triton.__version__, 'gpu', torch.cuda.is_available() and torch.cuda.get_device_name())"
}

# The wheel's _C goes next to the tree's attrspace/; the links give the tree the layout the wheel
# maps (attrspace/kernels, attrspace/_csrc), so the tree imports as the installed package would.
install_wheel() {
  local whl
  whl=$(ls "$1"/attrspace-*.whl) && "$PY" -m zipfile -e "$whl" "$1/unpacked" \
    && cp "$1"/unpacked/attrspace/_C*.so "$ROOT/attrspace/"
}

run_build() {
  local cap rc=0
  [ -e "$ROOT/attrspace/kernels" ] || ln -s ../kernels "$ROOT/attrspace/kernels"
  [ -e "$ROOT/attrspace/_csrc" ] || ln -s ../csrc "$ROOT/attrspace/_csrc"
  if [ "$DRY" = 1 ]; then
    echo "dry run: no build; the tree's attrspace and attrspace.kernels must import"
  else
    cap=$("$PY" -c "import torch; a, b = torch.cuda.get_device_capability(); print(f'{a}{b}')")
    if ! ATTRSPACE_CUDA_ARCHS="$cap" "$PY" -m pip wheel --no-deps --no-build-isolation --no-index \
        -q -w "$WORK/whl" "$ROOT" || ! install_wheel "$WORK/whl"; then
      echo "the build with the CUDA part failed; building without it (ATTRSPACE_CUDA=OFF)"
      rc=3
      rm -rf "$WORK/whl"
      ATTRSPACE_CUDA=OFF "$PY" -m pip wheel --no-deps --no-build-isolation --no-index -q \
        -w "$WORK/whl" "$ROOT" && install_wheel "$WORK/whl" || echo "the CPU-only build failed too"
    fi
    nvcc -std=c++17 --expt-relaxed-constexpr -DNDEBUG -I"$ROOT/csrc" "-arch=sm_$cap" -cubin \
      -o /dev/null -Xptxas -v --resource-usage "$ROOT/csrc/subspace_linear.cu" 2>&1 \
      | grep -E "Function properties|spill|Used" || true
  fi
  "$PY" -c "import attrspace, attrspace.kernels; print('attrspace imports from', attrspace.__file__)
try:
    import attrspace._C as c; print(c.build_info())
except ImportError as e:
    print('attrspace._C is missing:', e)" || rc=4
  return $rc
}

run_smoke() {
  local b r rc=0
  # seconds per backend (inside the step's 60): Triton compiles its two kernels cold
  declare -A limit=([torch]=12 [triton]=30 [cuda]=15)
  for b in torch triton cuda; do
    ATTRSPACE_TRITON_CONFIGS=one timeout "${limit[$b]}" "$PY" "$ROOT/bench/gpu_check.py" smoke "$b" \
      "$RESULTS/smoke_$b.json"
    r=$?
    echo "smoke $b: rc=$r"
    (( r != 0 )) && rc=$r
  done
  return $rc
}

# One Triton config (the first that fits: 128 x 256 on sm_90): autotuning every config of the four
# specialisations a step and `auto`'s measurement launch would take most of the step's time.
run_timings() {
  ATTRSPACE_TRITON_CONFIGS=one "$PY" "$ROOT/bench/gpu_check.py" timings "$RESULTS/timings.json"
}

run_svd() { "$PY" "$ROOT/bench/gpu_check.py" svd "$RESULTS/svd.json"; }

GPU_TESTS="tests/kernels/test_subspace_linear.py tests/kernels/test_factored_launches.py tests/backends/test_cuda_backend.py
  tests/backends/test_torch_backend.py tests/adapters/test_functional.py"
export GPU_TESTS
run_tests() {
  cd "$ROOT" || return 2
  if [ "$DRY" = 1 ]; then
    # shellcheck disable=SC2086
    "$PY" -P -m pytest -q --collect-only $GPU_TESTS > "$RESULTS/tests.txt"
  else
    # shellcheck disable=SC2086
    ATTRSPACE_TRITON_CONFIGS=one "$PY" -P -m pytest -q -rfEs -p no:cacheprovider $GPU_TESTS \
      | tee "$RESULTS/tests.txt"
  fi
}

for entry in "${PLAN[@]}"; do step "${entry%%:*}" "${entry#*:}" "run_${entry%%:*}"; done

{
  echo "===== gpu_check summary ($(( $(date +%s) - START ))s of ${BUDGET}s; step limits ${total}s" \
    "+ ${RESERVE_S}s reserve; dry run: $DRY)"
  for s in "${STEPS[@]}"; do printf '%-8s %s\n' "$s" "${STATUS[$s]}"; done
  "$PY" "$ROOT/bench/gpu_check.py" summary "$RESULTS" "$OUT/results.json" \
    || echo "(no figures could be read)"
} > "$WORK/summary.txt" 2>&1
cp "$WORK/summary.txt" "$OUT/summary.txt"
tar -czf "$OUT/logs.tar.gz" -C "$WORK" logs results
cat "$OUT/summary.txt"
