"""JSON over HTTP with the standard library, and a pool that spreads requests over endpoints.

Faults: a timeout, a refused or dropped connection and a 5xx are retried with exponential backoff
(on whichever endpoint is free next); a 4xx is the server refusing the request and is never retried.
An endpoint that fails `max_retries` times in a row is dropped while another lives; when none is
left the pool raises `EndpointsDown` (an OSError: one line on the CLI). Workers are daemon threads
and the caller waits in short slices, so Ctrl-C stops a build at once.
"""
from __future__ import annotations

import http.client
import json
import queue
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any


class RetryableError(OSError):
    """A timeout, a connection error or a 5xx: worth asking again."""


class RefusedError(ValueError):
    """A 4xx: the server refuses this request; asking again gives the same answer."""

    def __init__(self, url: str, status: int, message: str):
        super().__init__(f"{url} answered {status}: {message}")
        self.url, self.status, self.message = url, status, message


class EndpointsDown(OSError):
    """Every endpoint failed."""


def _error_message(body: bytes) -> str:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return body[:300].decode(errors="replace").strip()
    if isinstance(data, dict):
        err = data.get("error", data)
        if isinstance(err, dict):
            return str(err.get("message") or err.get("detail") or err)
        return str(data.get("message") or data.get("detail") or err)
    return str(data)


def request_json(url: str, body: Any = None, *, timeout: float) -> Any:
    """GET (body None) or POST JSON; the decoded JSON answer. Raises RetryableError or RefusedError."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="GET" if body is None else "POST",
                                 headers={"Content-Type": "application/json", "Accept": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
    except urllib.error.HTTPError as e:
        message = _error_message(e.read() or b"")
        if e.code >= 500:
            raise RetryableError(f"{url} answered {e.code}: {message}") from None
        raise RefusedError(url, e.code, message) from None
    except (urllib.error.URLError, TimeoutError, socket.timeout, ConnectionError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", None) or e
        raise RetryableError(f"{url}: {reason or type(e).__name__}") from None
    try:
        return json.loads(raw)
    except ValueError:
        raise RetryableError(f"{url}: the answer is not JSON ({raw[:80]!r})") from None


class Endpoint:
    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.alive = True
        self.failures = 0  # in a row
        self.last_error = ""
        self.info: dict[str, Any] = {}

    def __repr__(self) -> str:
        return self.url


class Pool:
    """`map(fn, items)`: fn(endpoint, item) for every item, `per_endpoint` at a time on each live endpoint."""

    def __init__(self, urls: Sequence[str | Endpoint], *, per_endpoint: int = 4, max_retries: int = 5, backoff: float = 1.0,
                 max_backoff: float = 60.0, log: Callable[[str], None] | None = None):
        if not urls:
            raise ValueError("no endpoint: give at least one --endpoint URL")
        if int(per_endpoint) < 1 or int(max_retries) < 1 or float(backoff) < 0:
            raise ValueError(f"concurrency and max_retries must be >= 1 and retry_backoff >= 0, got {per_endpoint}, "
                             f"{max_retries} and {backoff}")
        self.endpoints = [u if isinstance(u, Endpoint) else Endpoint(u) for u in urls]
        self.per_endpoint, self.max_retries = int(per_endpoint), int(max_retries)
        self.backoff, self.max_backoff = float(backoff), float(max_backoff)
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self._lock = threading.Lock()

    def only(self, ep: Endpoint) -> "Pool":
        """A pool over one of this pool's endpoints (shared: a drop there is a drop here)."""
        return Pool([ep], per_endpoint=1, max_retries=self.max_retries, backoff=self.backoff,
                    max_backoff=self.max_backoff, log=self.log)

    def live(self) -> list[Endpoint]:
        return [e for e in self.endpoints if e.alive]

    def drop(self, ep: Endpoint, reason: str) -> None:
        with self._lock:
            if ep.alive:
                ep.alive = False
                self.log(f"[qtarget] endpoint {ep.url} dropped: {reason}")

    def down_error(self) -> EndpointsDown:
        why = "; ".join(f"{e.url}: {e.last_error or 'dropped'}" for e in self.endpoints)
        return EndpointsDown(f"every endpoint failed ({why})")

    def _failed(self, ep: Endpoint, error: Exception) -> float:
        """Count a retryable failure; the backoff to wait before this endpoint's next request."""
        with self._lock:
            ep.failures += 1
            ep.last_error = str(error)
            failures = ep.failures
        if failures >= self.max_retries:
            self.drop(ep, f"{failures} failures in a row (last: {error})")
        return min(self.max_backoff, self.backoff * 2 ** (failures - 1))

    def call(self, ep: Endpoint, fn: Callable[[Endpoint], Any]) -> Any:
        """fn(ep) with retries on this one endpoint (used for the per-endpoint probes)."""
        while ep.alive:
            try:
                out = fn(ep)
            except RetryableError as e:
                wait = self._failed(ep, e)
                if ep.alive:
                    time.sleep(wait)
                continue
            with self._lock:
                ep.failures = 0
            return out
        return None

    def map(self, fn: Callable[[Endpoint, Any], Any], items: Sequence[Any],
            done: Callable[[int, Any], None] | None = None) -> list[Any]:
        results: list[Any] = [None] * len(items)
        todo: queue.Queue[int] = queue.Queue()
        for i in range(len(items)):
            todo.put(i)
        state = {"left": len(items), "fatal": None, "stop": False}
        finished = threading.Event()

        def worker(ep: Endpoint) -> None:
            while ep.alive and not state["stop"]:
                try:
                    i = todo.get(timeout=0.05)
                except queue.Empty:
                    if state["left"] == 0:
                        return
                    continue
                try:
                    out = fn(ep, items[i])
                except RetryableError as e:
                    todo.put(i)  # another endpoint, or this one after the backoff
                    wait = self._failed(ep, e)
                    if not ep.alive:
                        finished.set()  # let the waiter see whether any endpoint is left
                    time.sleep(wait if ep.alive else 0)
                    continue
                except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
                    with self._lock:
                        state["fatal"] = state["fatal"] or e
                        state["stop"] = True
                    finished.set()
                    return
                with self._lock:
                    if state["stop"]:
                        return
                    ep.failures = 0
                    results[i] = out
                    state["left"] -= 1
                    if done is not None:
                        done(i, out)
                    if state["left"] == 0:
                        finished.set()

        threads = [threading.Thread(target=worker, args=(ep,), daemon=True)  # interleaved: spread from the start
                   for _ in range(self.per_endpoint) for ep in self.live()]
        for t in threads:
            t.start()
        try:
            while True:
                finished.wait(0.1)
                finished.clear()
                if state["fatal"] is not None or state["left"] == 0 or not self.live():
                    break
        finally:
            state["stop"] = True
        if state["fatal"] is not None:
            raise state["fatal"]
        if state["left"]:
            raise self.down_error()
        return results
