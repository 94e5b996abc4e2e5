"""The teacher in a vLLM engine in this process (`vllm.LLM`, a GPU path): token-id prompts,
`SamplingParams(prompt_logprobs=k, max_tokens=1, temperature=1, detokenize=False)`, raw log-probs
(`logprobs_mode="raw_logprobs"`), prefix caching off. vLLM is imported only when this engine is used.
`RequestOutput.prompt_logprobs` has the shape of the server's answer (None at position 0, then
{token id: Logprob(logprob, rank, decoded_token)} with the top-k and possibly the prompt token).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from qtarget.teacher_cache.engines.base import Engine, Entry, Progress, PromptTopK
from qtarget.teacher_cache.engines.server import RAW

CHUNK = 256  # prompts per generate() call (the progress bar's step)


def parse_entries(prompt_logprobs) -> list[Entry]:
    return [None if e is None else [(int(tid), float(lp.logprob), getattr(lp, "rank", None)) for tid, lp in e.items()]
            for e in prompt_logprobs]


class VLLMLocal(Engine):
    name = "vllm"

    def __init__(self, model: str, *, top_k: int, dtype: str | None = None, teacher_name: str | None = None,
                 **llm_kwargs: Any):
        self.model, self.top_k, self.dtype, self.teacher_name = model, int(top_k), dtype, teacher_name
        self.llm_kwargs = llm_kwargs
        self.llm = None
        self.version = "unknown"

    def open(self) -> None:
        import vllm  # noqa: PLC0415 - optional, heavy: only for --engine vllm

        kwargs = dict(model=self.model, max_logprobs=self.top_k, enable_prefix_caching=False,
                      logprobs_mode="raw_logprobs", **self.llm_kwargs)
        if self.dtype and self.dtype != "auto":
            kwargs["dtype"] = self.dtype
        self.version = f"vllm {getattr(vllm, '__version__', 'unknown')}"
        self._sampling = vllm.SamplingParams
        self.llm = vllm.LLM(**kwargs)

    def close(self) -> None:
        self.llm = None

    def identity(self) -> dict[str, Any]:
        return {"name": str(self.teacher_name or self.model), "revision": None, "weights": None}

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version,
                "settings": {**RAW, "max_tokens": 1, "prompt_logprobs": "top_k", "logprobs_mode": "raw_logprobs",
                             "enable_prefix_caching": False, "detokenize": False}}

    def tokenize(self, text: str, add_special_tokens: bool) -> list[int] | None:
        tok = self.llm.get_tokenizer()
        return list(tok.encode(text, add_special_tokens=add_special_tokens))

    def check_rows(self, rows: Sequence[Mapping[str, Any]], top_k: int, temperature: float) -> None:
        if float(temperature) != 1.0:
            raise ValueError("--engine vllm caches the raw distribution at temperature 1: build with --temperature 1 "
                             "and set the objective's temperature instead")
        if any(r.get("position_ids") is not None for r in rows):
            raise ValueError("--engine vllm runs one sequence per prompt: packed rows (packing: true) are not "
                             "supported; build without packing or with --engine hf")

    def prompt_topk(self, prompts: Sequence[Sequence[int]], top_k: int, progress: Progress | None = None
                    ) -> list[PromptTopK]:
        params = self._sampling(max_tokens=1, prompt_logprobs=int(top_k), detokenize=False, seed=0,
                                **{k: v for k, v in RAW.items()})
        out = []
        for c0 in range(0, len(prompts), CHUNK):
            chunk = [list(map(int, p)) for p in prompts[c0:c0 + CHUNK]]
            results = self.llm.generate([{"prompt_token_ids": ids} for ids in chunk], params, use_tqdm=False)
            for res in results:
                out.append(PromptTopK([int(t) for t in res.prompt_token_ids], parse_entries(res.prompt_logprobs)))
            if progress is not None:
                progress(sum(len(p) for p in chunk))
        return out
