"""Teacher engines: where the teacher's top-k log-probs come from. An engine is an adapter (base.py
states the question: top-k log-probs of these token ids); the cache writer and the preflight are
shared by all of them.

    hf             a transformers model in this process (default)
    vllm           vllm.LLM in this process (GPU)
    vllm-server    a running vLLM server (OpenAI-compatible /v1/completions, prompt_logprobs)
    sglang-server  a running SGLang server (/generate, input_ids, return_logprob)
"""
from qtarget.teacher_cache.engines.base import Engine, EngineError, PromptTopK, TopKRows
from qtarget.teacher_cache.engines.hf import HFEngine, teacher_topk_rows
from qtarget.teacher_cache.engines.http import EndpointsDown
from qtarget.teacher_cache.engines.preflight import preflight
from qtarget.teacher_cache.engines.sglang_server import SGLangServer
from qtarget.teacher_cache.engines.vllm_local import VLLMLocal
from qtarget.teacher_cache.engines.vllm_server import VLLMServer

ENGINES = ("hf", "vllm", "vllm-server", "sglang-server")
SERVERS = {"vllm-server": VLLMServer, "sglang-server": SGLangServer}

__all__ = ["ENGINES", "SERVERS", "Engine", "EngineError", "EndpointsDown", "HFEngine", "PromptTopK", "SGLangServer",
           "TopKRows", "VLLMLocal", "VLLMServer", "preflight", "teacher_topk_rows"]
