"""What the two HTTP engines share: endpoints, a pool of requests, one request per row."""
from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

from qtarget.teacher_cache.engines.base import Engine, EngineError, Progress, PromptTopK
from qtarget.teacher_cache.engines.http import Endpoint, Pool, RefusedError

# sampling settings sent with every request: the raw distribution at temperature 1, nothing reshaping it
RAW = {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "min_p": 0.0, "presence_penalty": 0.0,
       "frequency_penalty": 0.0, "repetition_penalty": 1.0}


class ServerEngine(Engine):
    """A teacher served over HTTP at one or more endpoints. Subclasses implement `connect`
    (model info of one endpoint), `request` (one prompt's top-k) and `tokenize_at`."""

    def __init__(self, endpoints: Sequence[str], *, teacher_name: str | None = None, served_model: str | None = None,
                 concurrency: int = 4, timeout: float = 600.0, max_retries: int = 5, backoff: float = 1.0, log=None):
        if float(timeout) <= 0:
            raise ValueError(f"--request_timeout must be > 0 seconds, got {timeout}")
        self.pool = Pool(list(endpoints), per_endpoint=concurrency, max_retries=max_retries, backoff=backoff, log=log)
        self.teacher_name, self.served_model, self.timeout = teacher_name, served_model, float(timeout)
        self.model: str | None = None
        self.version = "unknown"
        self.max_length: int | None = None  # longest prompt the server takes (None: it did not say)

    # -- per subclass ------------------------------------------------------------------------
    def connect(self, ep: Endpoint) -> dict[str, Any]:
        """{"model": name, "version": str, "max_length": int | None} of one endpoint."""
        raise NotImplementedError

    def request(self, ep: Endpoint, ids: list[int], top_k: int) -> PromptTopK:
        raise NotImplementedError

    def tokenize_at(self, ep: Endpoint, text: str, add_special_tokens: bool) -> list[int] | None:
        return None

    # -- Engine ------------------------------------------------------------------------------
    def open(self) -> None:
        for ep in self.pool.endpoints:
            info = self.pool.call(ep, self.connect)
            if info is None:
                continue
            if self.served_model and info["model"] != self.served_model:
                raise ValueError(f"{ep.url} serves {info['model']!r}, not --served_model {self.served_model!r}")
            ep.info = info
        live = self.pool.live()
        if not live:
            raise self.pool.down_error()
        models = {ep.info["model"] for ep in live}
        if len(models) > 1:
            raise ValueError(f"the endpoints serve different models ({', '.join(sorted(map(str, models)))}): "
                             f"give endpoints of one teacher")
        self.model = models.pop()
        self.version = ", ".join(sorted({str(ep.info.get("version", "unknown")) for ep in live}))
        lengths = [ep.info["max_length"] for ep in live if ep.info.get("max_length")]
        self.max_length = min(lengths) if lengths else None

    def identity(self) -> dict[str, Any]:
        return {"name": str(self.teacher_name or self.model), "revision": None, "weights": None}

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "settings": self.settings()}

    def settings(self) -> dict[str, Any]:
        return dict(RAW)

    def probes(self) -> list[tuple[str, Engine]]:
        """One view per live endpoint: the preflight checks each server on its own."""
        views = []
        for ep in self.pool.live():
            view = copy.copy(self)
            view.pool = self.pool.only(ep)
            views.append((f"{self.name} {ep.url}", view))
        return views

    def tokenize(self, text: str, add_special_tokens: bool) -> list[int] | None:
        got = [self.pool.call(ep, lambda e: self.tokenize_at(e, text, add_special_tokens)) for ep in self.pool.live()]
        if add_special_tokens and got and got[0] is None and self.pool.live():
            self.pool.log(f"[qtarget] {self.name} {self.pool.live()[0].url} does not tokenise text: its tokenizer is "
                          f"not compared with the student's (the probe still checks BOS, k and the vocabulary)")
        return got[0] if got else None

    def check_rows(self, rows: Sequence[Mapping[str, Any]], top_k: int, temperature: float) -> None:
        if float(temperature) != 1.0:
            raise ValueError(f"--engine {self.name} caches the raw distribution at temperature 1 (servers return raw "
                             f"log-probs): build with --temperature 1 and set the objective's temperature instead")
        for i, row in enumerate(rows):
            if row.get("position_ids") is not None:
                raise ValueError(f"--engine {self.name} sends one sequence per request: packed rows (packing: true) "
                                 f"are not supported; build without packing or with --engine hf")
            if self.max_length is not None and len(row["input_ids"]) + 1 > self.max_length:
                raise ValueError(f"row {i} has {len(row['input_ids'])} tokens; the server takes at most "
                                 f"{self.max_length} with one generated token (raise the server's --max-model-len / "
                                 f"--context-length, or lower --max_length)")

    def prompt_topk(self, prompts: Sequence[Sequence[int]], top_k: int, progress: Progress | None = None
                    ) -> list[PromptTopK]:
        def ask(ep: Endpoint, ids: list[int]) -> PromptTopK:
            try:
                return self.request(ep, ids, top_k)
            except RefusedError as e:
                raise self.refused(e, top_k) from None

        done = None if progress is None else (lambda i, _: progress(len(prompts[i])))
        return self.pool.map(ask, [list(map(int, p)) for p in prompts], done)

    def refused(self, error: RefusedError, top_k: int) -> EngineError:
        return EngineError(f"{self.name}: {error.url} refused the request ({error.status}: {error.message})")
