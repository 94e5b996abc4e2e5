#!/usr/bin/env bash
# A separate virtual environment with verl 0.9.1 (and the pins its own metadata asks for: transformers < 5.11,
# tensordict <= 0.10, ray, ...) plus qtarget's torch-only core from this checkout, installed --no-deps (qtarget's
# full dependency set asks for a newer transformers than verl allows). tests/test_integration_verl.py runs its
# opt-in tests with this venv's python; without the venv they skip.
# Usage: scripts/setup_verl.sh            (idempotent; rebuilds when this script changes)
# Env:   QTARGET_VERL_VENV  venv folder (default /tmp/qtarget-verl);  PYTHON  interpreter (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${QTARGET_VERL_VENV:-/tmp/qtarget-verl}
PY=${PYTHON:-python3}
STAMP="$VENV/.qtarget-verl-$(cat "$0" constraints.txt | sha1sum | cut -c1-12)"
if [ -f "$STAMP" ]; then exit 0; fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
say() { echo "[setup_verl $(date -u +%H:%M:%S)] $*" >&2; }
say "torch first (constraints.txt: the CPU build), then verl 0.9.1 with its own pins, into $VENV"
$PIP install -c constraints.txt torch
# uvicorn and fastapi: verl.trainer.sft_trainer imports them (through verl.checkpoint_engine) but only verl's
# heavy [verl-core] extra lists them
$PIP install -c constraints.txt "verl==0.9.1" uvicorn fastapi "pytest>=8"
say "qtarget's core from this checkout, editable, without dependencies"
$PIP install --no-deps -e .
rm -f "$VENV"/.qtarget-verl-*
touch "$STAMP"
"$VENV/bin/python" -c "import torch, transformers, tensordict, verl; print('[setup_verl] torch', torch.__version__, \
'transformers', transformers.__version__, 'tensordict', tensordict.__version__, 'verl', verl.__version__)"
