"""A running SGLang server, through its native `/generate` with `input_ids`, `return_logprob`,
`logprob_start_len = 0` and `top_logprobs_num = k`. The answer's `meta_info.input_top_logprobs` is a
list over the prompt: None at position 0, then per position k triples [logprob, token id, text or
None]; `meta_info.input_token_logprobs` holds [logprob, id, text] of each prompt token, i.e. the ids
the server read.

Start the server with `--disable-radix-cache` (prefix caching off); see docs/teacher_cache.md.
"""
from __future__ import annotations

from typing import Any

from qtarget.teacher_cache.engines.base import Entry, EngineError, PromptTopK
from qtarget.teacher_cache.engines.http import Endpoint, RefusedError, RetryableError, request_json
from qtarget.teacher_cache.engines.server import RAW, ServerEngine


def parse_entries(top: list) -> list[Entry]:
    return [None if not e else [(int(x[1]), float(x[0]), None) for x in e] for e in top]


class SGLangServer(ServerEngine):
    name = "sglang-server"

    def connect(self, ep: Endpoint) -> dict[str, Any]:
        info = request_json(f"{ep.url}/get_model_info", timeout=self.timeout)
        try:
            server = request_json(f"{ep.url}/get_server_info", timeout=self.timeout)
        except (RetryableError, RefusedError):
            server = {}
        max_length = server.get("max_req_input_len") or server.get("context_length")
        return {"model": info.get("model_path") or "unknown", "version": f"sglang {server.get('version', 'unknown')}",
                "max_length": max_length}

    def settings(self) -> dict[str, Any]:
        sampling = {("max_new_tokens" if k == "max_tokens" else k): v for k, v in RAW.items()}
        return {**sampling, "max_new_tokens": 1, "logprob_start_len": 0, "top_logprobs_num": "top_k"}

    def _generate(self, ep: Endpoint, body: dict) -> dict:
        answer = request_json(f"{ep.url}/generate", body, timeout=self.timeout)
        if isinstance(answer, list):
            answer = answer[0]
        meta = answer.get("meta_info") if isinstance(answer, dict) else None
        if not meta or meta.get("input_token_logprobs") is None:
            raise EngineError(f"{self.name}: {ep.url}/generate returned no input log-probs (meta_info."
                              f"input_token_logprobs)")
        return meta

    def request(self, ep: Endpoint, ids: list[int], top_k: int) -> PromptTopK:
        body = {"input_ids": ids, "sampling_params": {**RAW, "max_new_tokens": 1}, "return_logprob": True,
                "logprob_start_len": 0, "top_logprobs_num": int(top_k), "return_text_in_logprobs": False,
                "stream": False}
        meta = self._generate(ep, body)
        echoed = [int(e[1]) for e in meta["input_token_logprobs"]]
        top = meta.get("input_top_logprobs") or []
        if len(top) == len(echoed) - 1:  # a server that leaves out position 0
            top = [None] + list(top)
        return PromptTopK(echoed, parse_entries(top))

    def tokenize_at(self, ep: Endpoint, text: str, add_special_tokens: bool) -> list[int] | None:
        if not add_special_tokens:
            return None  # /generate tokenises text the server's way (with its special tokens)
        body = {"text": text, "sampling_params": {**RAW, "max_new_tokens": 1}, "return_logprob": True,
                "logprob_start_len": 0, "top_logprobs_num": 0, "return_text_in_logprobs": False, "stream": False}
        try:
            return [int(e[1]) for e in self._generate(ep, body)["input_token_logprobs"]]
        except RefusedError:  # a server without a tokenizer (--skip-tokenizer-init) refuses text
            return None

    def refused(self, error: RefusedError, top_k: int) -> EngineError:
        return EngineError(f"{self.name}: {error.url} refused the request ({error.status}: {error.message}); "
                           f"top_logprobs_num was {top_k}")
