#!/usr/bin/env bash
# A separate virtual environment with LLaMA-Factory 0.9.5 (and the pins its own metadata asks for: transformers
# <= 5.6, datasets <= 4.0, peft 0.18, trl <= 0.24, ...) plus qtarget from this checkout, installed --no-deps
# (qtarget's full dependency set asks for a newer transformers than LLaMA-Factory allows).
# tests/test_integration_llamafactory.py runs its opt-in tests with this venv's python; without it they skip.
# Usage: scripts/setup_llamafactory.sh     (idempotent; rebuilds when this script changes)
# Env:   QTARGET_LLAMAFACTORY_VENV  venv folder (default /tmp/qtarget-llamafactory);  PYTHON  interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${QTARGET_LLAMAFACTORY_VENV:-/tmp/qtarget-llamafactory}
PY=${PYTHON:-python3}
STAMP="$VENV/.qtarget-llamafactory-$(cat "$0" constraints.txt | sha1sum | cut -c1-12)"
if [ -f "$STAMP" ]; then exit 0; fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
say() { echo "[setup_llamafactory $(date -u +%H:%M:%S)] $*" >&2; }
say "torch first (constraints.txt: the CPU build), then LLaMA-Factory 0.9.5 with its own pins, into $VENV"
$PIP install -c constraints.txt torch
$PIP install -c constraints.txt "llamafactory==0.9.5" "pytest>=8"
# PyPI's torchvision 0.28 (a CUDA build) does not load against the CPU torch ("operator torchvision::nms does
# not exist", raised through every transformers model import): removed; transformers then skips its image
# processors. torchaudio has no release for torch 2.13 (PyPI's newest is 2.11.1) and its compiled extension
# does not load against it, but LLaMA-Factory imports torchaudio at module level (data/mm_plugin.py, used for
# audio inputs only): its compiled libraries are removed so that it imports as pure Python.
$PIP uninstall -y torchvision
rm -f "$VENV"/lib/python3*/site-packages/torchaudio/lib/*.so
say "qtarget from this checkout, editable, without dependencies (its core needs torch, safetensors, pyyaml)"
$PIP install --no-deps -e .
rm -f "$VENV"/.qtarget-llamafactory-*
touch "$STAMP"
"$VENV/bin/python" -c "import torch, transformers, llamafactory; print('[setup_llamafactory] torch', torch.__version__, \
'transformers', transformers.__version__, 'llamafactory', llamafactory.__version__)"
