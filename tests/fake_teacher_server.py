"""A teacher server for tests: a real HTTP server on 127.0.0.1 (ThreadingHTTPServer in a thread) that
speaks vLLM's OpenAI-compatible API (/v1/models, /version, /tokenize, /v1/completions with
prompt_logprobs) or SGLang's native API (/get_model_info, /get_server_info, /generate with input_ids /
text, return_logprob, top_logprobs_num), backed by a Hugging Face model in this process.

The answers have the servers' shapes: vLLM's prompt_logprobs is None at position 0, then a dict with
string keys {id: {"logprob", "rank", "decoded_token"}} of the top-k plus the prompt token when it is
outside them (k + 1 entries); SGLang's input_top_logprobs is None at 0, then [logprob, id, None]
triples. `Faults` injects what goes wrong with real servers.
"""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch


@dataclass
class Faults:
    fail_first: int = 0  # the first N scoring requests answer 500
    slow_first: int = 0  # the first N scoring requests wait `delay` seconds first
    delay: float = 0.0
    every_delay: float = 0.0  # every scoring request waits this long
    cap_k: int | None = None  # vLLM: 400 above it (as --max-logprobs); SGLang: silently fewer entries
    add_bos: int | None = None  # this id is put before every token-id prompt
    drop_first: bool = False  # the first prompt id is dropped
    die_after: int | None = None  # after N answered scoring requests, connections are closed unanswered
    bad_id: int | None = None  # replaces the most probable id of every position
    no_prompt_token_ids: bool = False  # an older vLLM: no prompt_token_ids in the choice
    no_tokenize: bool = False  # no text tokenisation (vLLM: /tokenize 404; SGLang: text refused with 400)


class FakeTeacherServer:
    def __init__(self, model, tokenizer, flavor: str = "vllm", faults: Faults | None = None,
                 name: str = "tiny-teacher", max_len: int = 4096):
        assert flavor in ("vllm", "sglang")
        self.model, self.tokenizer, self.flavor = model.eval(), tokenizer, flavor
        self.faults, self.name, self.max_len = faults or Faults(), name, max_len
        self.lock = threading.Lock()
        self.scoring = 0  # scoring requests received
        self.answered = 0
        self.widest = 0  # most entries seen at one position (k + 1 when a label was outside the top-k)
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> "FakeTeacherServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    # -- the model ---------------------------------------------------------------------------
    @torch.no_grad()
    def logprobs(self, ids: list[int]) -> torch.Tensor:
        logits = self.model(input_ids=torch.tensor([ids])).logits[0]
        return torch.log_softmax(logits.float(), dim=-1)  # [T, V]: row t - 1 predicts token t

    def prompt_ids(self, ids: list[int]) -> list[int]:
        f = self.faults
        ids = list(ids)
        if f.add_bos is not None:
            ids = [f.add_bos] + ids
        if f.drop_first:
            ids = ids[1:]
        return ids

    def top(self, row: torch.Tensor, k: int) -> list[tuple[int, float]]:
        top = row.topk(k)
        pairs = [(int(i), float(v)) for i, v in zip(top.indices, top.values)]
        if self.faults.bad_id is not None:
            pairs[0] = (self.faults.bad_id, pairs[0][1])
        return pairs

    def vllm_completion(self, body: dict) -> tuple[int, dict]:
        k = int(body["prompt_logprobs"])
        if self.faults.cap_k is not None and k > self.faults.cap_k:
            return 400, {"object": "error", "type": "BadRequestError", "code": 400, "param": None,
                         "message": f"Requested prompt logprobs of {k}, which is greater than max allowed: "
                                    f"{self.faults.cap_k}"}
        if body.get("temperature") != 1.0 or body.get("repetition_penalty") != 1.0:
            return 400, {"object": "error", "message": "this fake serves the raw distribution only", "code": 400}
        ids = self.prompt_ids(body["prompt"])
        lp = self.logprobs(ids)
        entries: list = [None]
        for t in range(1, len(ids)):
            d = {str(i): {"logprob": v, "rank": r + 1, "decoded_token": self.tokenizer.decode([i])}
                 for r, (i, v) in enumerate(self.top(lp[t - 1], k))}
            if str(ids[t]) not in d:
                rank = int((lp[t - 1] > lp[t - 1, ids[t]]).sum()) + 1
                d[str(ids[t])] = {"logprob": float(lp[t - 1, ids[t]]), "rank": rank, "decoded_token": "x"}
            with self.lock:
                self.widest = max(self.widest, len(d))
            entries.append(d)
        choice = {"index": 0, "text": "x", "logprobs": None, "finish_reason": "length", "stop_reason": None,
                  "prompt_logprobs": entries}
        if body.get("return_token_ids") and not self.faults.no_prompt_token_ids:
            choice["prompt_token_ids"] = ids
            choice["token_ids"] = [int(lp[-1].argmax())]
        return 200, {"id": "cmpl-fake", "object": "text_completion", "created": 0, "model": self.name,
                     "choices": [choice], "usage": {"prompt_tokens": len(ids), "completion_tokens": 1,
                                                    "total_tokens": len(ids) + 1}}

    def sglang_generate(self, body: dict) -> tuple[int, dict]:
        if "text" in body:
            ids = list(self.tokenizer(body["text"])["input_ids"])
        else:
            ids = self.prompt_ids(body["input_ids"])
        k = int(body.get("top_logprobs_num") or 0)
        if self.faults.cap_k is not None:
            k = min(k, self.faults.cap_k)
        lp = self.logprobs(ids)
        token = [[None, ids[0], None]] + [[float(lp[t - 1, ids[t]]), ids[t], None] for t in range(1, len(ids))]
        top = [None] + [[[v, i, None] for i, v in self.top(lp[t - 1], k)] if k else None for t in range(1, len(ids))]
        out = int(lp[-1].argmax())
        return 200, {"text": "x", "output_ids": [out],
                     "meta_info": {"id": "fake", "prompt_tokens": len(ids), "completion_tokens": 1,
                                   "finish_reason": {"type": "length", "length": 1},
                                   "input_token_logprobs": token, "input_top_logprobs": top,
                                   "output_token_logprobs": [[float(lp[-1, out]), out, None]],
                                   "output_top_logprobs": [None]}}


def _handler(app: FakeTeacherServer):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # quiet
            pass

        def send_json(self, status: int, data) -> None:
            raw = json.dumps(data).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (a timeout)
                pass

        def do_GET(self) -> None:
            if app.flavor == "vllm" and self.path == "/v1/models":
                return self.send_json(200, {"object": "list", "data": [
                    {"id": app.name, "object": "model", "owned_by": "vllm", "root": app.name,
                     "max_model_len": app.max_len}]})
            if app.flavor == "vllm" and self.path == "/version":
                return self.send_json(200, {"version": "0.0.fake"})
            if app.flavor == "sglang" and self.path == "/get_model_info":
                return self.send_json(200, {"model_path": app.name, "tokenizer_path": app.name, "is_generation": True})
            if app.flavor == "sglang" and self.path == "/get_server_info":
                return self.send_json(200, {"version": "0.0.fake", "max_req_input_len": app.max_len})
            self.send_json(404, {"detail": "Not Found"})

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            if app.faults.no_tokenize and (self.path == "/tokenize" or "text" in body):
                return self.send_json(404 if self.path == "/tokenize" else 400, {"detail": "no tokenizer"})
            if app.flavor == "vllm" and self.path == "/tokenize":
                ids = list(app.tokenizer(body["prompt"], add_special_tokens=body.get("add_special_tokens", True))
                           ["input_ids"])
                return self.send_json(200, {"count": len(ids), "max_model_len": app.max_len, "tokens": ids})
            scoring = (app.flavor == "vllm" and self.path == "/v1/completions") or \
                      (app.flavor == "sglang" and self.path == "/generate")
            if not scoring:
                return self.send_json(404, {"detail": "Not Found"})
            f = app.faults
            with app.lock:
                app.scoring += 1
                n = app.scoring
                dead = f.die_after is not None and app.answered >= f.die_after
            if dead:
                self.close_connection = True  # no answer: the client sees the connection closed
                return
            if n <= f.fail_first:
                return self.send_json(500, {"object": "error", "message": "injected failure", "code": 500})
            if n <= f.slow_first:
                time.sleep(f.delay)
            if f.every_delay:
                time.sleep(f.every_delay)
            status, data = app.vllm_completion(body) if app.flavor == "vllm" else app.sglang_generate(body)
            with app.lock:
                app.answered += 1
            self.send_json(status, data)

    return Handler
