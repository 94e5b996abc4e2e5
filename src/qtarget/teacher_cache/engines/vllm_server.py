"""A running vLLM server, through its OpenAI-compatible `/v1/completions` with a token-id prompt and
`prompt_logprobs = k`. The answer's `choices[0].prompt_logprobs` is a list over the prompt: None at
position 0, then per position a dict {token id (a string in JSON): {"logprob", "rank",
"decoded_token"}} holding the top-k and, when it is outside them, the prompt token itself (k + 1
entries). `prompt_token_ids` (asked for with `return_token_ids`) are the ids the server read.

Start the server with `--max-logprobs K` (>= --top_k; vLLM's default is 20), the default
`--logprobs-mode raw_logprobs`, and `--no-enable-prefix-caching`; see docs/teacher_cache.md.
"""
from __future__ import annotations

from typing import Any

from qtarget.teacher_cache.engines.base import Entry, EngineError, PromptTopK
from qtarget.teacher_cache.engines.http import Endpoint, RefusedError, RetryableError, request_json
from qtarget.teacher_cache.engines.server import RAW, ServerEngine


def base_url(url: str) -> str:
    url = url.rstrip("/")
    return url[:-3] if url.endswith("/v1") else url


def parse_entries(prompt_logprobs: list) -> list[Entry]:
    """vLLM's prompt_logprobs -> [(id, logprob, rank)] per position (None stays None)."""
    out: list[Entry] = []
    for e in prompt_logprobs:
        if e is None:
            out.append(None)
            continue
        row = []
        for tid, v in e.items():
            if isinstance(v, dict):
                row.append((int(tid), float(v["logprob"]), v.get("rank")))
            else:  # a bare number
                row.append((int(tid), float(v), None))
        out.append(row)
    return out


def echoed_ids(choice: dict, sent: list[int], entries: list[Entry]) -> list[int]:
    """The ids the server read: `prompt_token_ids` when it returns them; else inferred from the entries
    (each holds its prompt token), which tells a shifted prompt from the sent one."""
    ids = choice.get("prompt_token_ids")
    if ids is not None:
        return [int(t) for t in ids]
    if len(entries) == len(sent) and all(e is not None and sent[t] in {x[0] for x in e}
                                         for t, e in enumerate(entries) if t):
        return list(sent)
    if len(entries) == len(sent) + 1:
        return [-1] + list(sent)  # one more position than sent: a token was added at the start
    return [-1] * len(entries)


class VLLMServer(ServerEngine):
    name = "vllm-server"

    def __init__(self, endpoints, **kw):
        super().__init__([base_url(u) for u in endpoints], **kw)

    def connect(self, ep: Endpoint) -> dict[str, Any]:
        models = request_json(f"{ep.url}/v1/models", timeout=self.timeout).get("data") or []
        if not models:
            raise EngineError(f"{ep.url}/v1/models lists no model")
        card = next((m for m in models if m.get("id") == self.served_model), models[0])
        try:
            version = request_json(f"{ep.url}/version", timeout=self.timeout).get("version", "unknown")
        except (RetryableError, RefusedError):
            version = "unknown"
        return {"model": card["id"], "version": f"vllm {version}", "max_length": card.get("max_model_len")}

    def settings(self) -> dict[str, Any]:
        return {**RAW, "max_tokens": 1, "prompt_logprobs": "top_k", "logprobs_mode": "raw_logprobs (server default)"}

    def request(self, ep: Endpoint, ids: list[int], top_k: int) -> PromptTopK:
        body = {"model": self.model, "prompt": ids, "max_tokens": 1, "prompt_logprobs": int(top_k), "echo": False,
                "add_special_tokens": False, "return_token_ids": True, "n": 1, "stream": False, **RAW}
        answer = request_json(f"{ep.url}/v1/completions", body, timeout=self.timeout)
        try:
            choice = answer["choices"][0]
        except (KeyError, IndexError, TypeError):
            raise EngineError(f"{self.name}: {ep.url}/v1/completions answered without choices") from None
        if choice.get("prompt_logprobs") is None:
            raise EngineError(f"{self.name}: {ep.url} returned no prompt_logprobs (a vLLM that supports "
                              f"`prompt_logprobs` in /v1/completions is needed)")
        entries = parse_entries(choice["prompt_logprobs"])
        return PromptTopK(echoed_ids(choice, ids, entries), entries)

    def tokenize_at(self, ep: Endpoint, text: str, add_special_tokens: bool) -> list[int] | None:
        body = {"model": self.model, "prompt": text, "add_special_tokens": bool(add_special_tokens)}
        try:
            return [int(t) for t in request_json(f"{ep.url}/tokenize", body, timeout=self.timeout)["tokens"]]
        except RefusedError:  # no /tokenize (or no tokenizer): the probe's echo and ids still check the rest
            return None

    def refused(self, error: RefusedError, top_k: int) -> EngineError:
        if "logprob" in error.message.lower():
            return EngineError(f"{self.name}: {error.url} refused prompt_logprobs={top_k} ({error.message}): start "
                               f"vLLM with --max-logprobs {top_k} or more, or lower --top_k")
        return super().refused(error, top_k)
