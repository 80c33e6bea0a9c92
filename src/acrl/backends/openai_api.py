"""Reasoner and clarifier behind an OpenAI-compatible ``/v1/chat/completions`` endpoint (vLLM, ``acrl serve``, ...).

- :class:`OpenAIReasoner` implements ``acrl.rollout.protocols.Reasoner``: one chat completion per prompt (the prompt is
  the single user message), all requests of a call issued concurrently, at most ``concurrency`` in flight.
- :class:`OpenAIClarifier` implements ``acrl.rollout.protocols.Clarifier``: the image travels as a base64 PNG
  ``image_url`` data URL next to the text of ``acrl.rollout.prompts.clarify_prompt(question)`` (the format vLLM's VLM
  servers accept).

Failure handling: connection errors, timeouts, HTTP 429, HTTP 5xx and malformed bodies are retried with exponential
backoff and jitter; other 4xx are not. A request that still fails becomes a :class:`ServiceError` instance in its
slot (the episode is then ``failed``); a single failed request never raises. ``check()`` fails fast with a
``ConnectionError`` naming the URL when nothing listens there.

``complete``/``answer`` are synchronous: they run the requests on a private event loop in a daemon thread (one
``httpx.AsyncClient`` per event loop), so they work from any thread, including one that runs its own event loop.
``acomplete``/``aanswer`` are the coroutine versions for callers that already are async.

Temperature-0 responses can be cached (``cache="memory"`` or a JSONL path for an on-disk cache that later runs
reuse), keyed by a hash of the full request body.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import io
import json
import os
import random
import threading
import time
import weakref
from collections.abc import Sequence
from typing import Any

import httpx

from acrl.rollout.grading import strip_think
from acrl.rollout.prompts import clarify_prompt, few_shot_messages

THINK_MODES = ("strip", "keep")


def strip_thinking(text: str) -> str:
    """Remove R1-style reasoning (see :func:`acrl.rollout.grading.strip_think`) and surrounding whitespace."""
    return strip_think(text).strip()


class ServiceError(RuntimeError):
    """A request that failed after its retries. ``url``, ``status`` (None: no HTTP response) and ``attempts``."""

    def __init__(self, message: str, url: str, status: int | None = None, attempts: int = 1):
        super().__init__(message)
        self.url, self.status, self.attempts = url, status, attempts


class _Retryable(Exception):
    def __init__(self, message: str, status: int | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.status, self.retry_after = status, retry_after


def normalize_base_url(url: str) -> str:
    """``http://host:8000``, ``http://host:8000/`` and ``http://host:8000/v1`` all mean the same server."""
    url = (url or "").strip().rstrip("/")
    if not url:
        raise ValueError("base_url is empty: set the service URL, e.g. http://127.0.0.1:8000/v1")
    if "://" not in url:
        url = "http://" + url
    url = url.removesuffix("/v1")
    return url


class _LoopThread:
    """A private event loop running forever in a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.pid = os.getpid()
        self.thread = threading.Thread(target=self.loop.run_forever, name="acrl-openai-loop", daemon=True)
        self.thread.start()

    def run(self, coro):
        if threading.current_thread() is self.thread:
            coro.close()
            raise RuntimeError("synchronous call from inside the client's own event loop; use the async method")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def shutdown(self, clients: weakref.WeakKeyDictionary) -> None:
        """Close this loop's HTTP clients and stop the loop (also run as the owner's finalizer)."""
        if self.pid != os.getpid():                           # a forked child: the thread is not ours
            return
        slots = clients.pop(self.loop, None)
        if self.loop.is_running():
            fut = asyncio.run_coroutine_threadsafe(_aclose(slots), self.loop)
            if threading.current_thread() is self.thread:
                fut.add_done_callback(lambda _: self.loop.stop())
                return
            with contextlib.suppress(Exception):              # closing is best effort
                fut.result(timeout=5)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=5)
        if not self.loop.is_running() and not self.loop.is_closed():
            self.loop.close()


async def _aclose(slots) -> None:
    if slots is not None:
        await slots.aclose()


class _Slots:
    """At most ``concurrency`` requests in flight, spread over HTTP clients of at most ``per_client`` connections
    each (httpx's connection pool does work proportional to its size on every request, so one big pool makes the
    client, not the server, the bottleneck at high concurrency)."""

    per_client = 8

    def __init__(self, concurrency: int, timeout: float, headers: dict):
        n = -(-concurrency // self.per_client)
        size = -(-concurrency // n)
        limits = httpx.Limits(max_connections=size, max_keepalive_connections=size)
        self.clients = [httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
                                          limits=limits, headers=headers) for _ in range(n)]
        self.free: asyncio.Queue = asyncio.Queue()
        for i in range(concurrency):
            self.free.put_nowait(self.clients[i % n])

    async def acquire(self) -> httpx.AsyncClient:
        return await self.free.get()

    def release(self, client: httpx.AsyncClient) -> None:
        self.free.put_nowait(client)

    async def aclose(self) -> None:
        for c in self.clients:
            await c.aclose()


class _ChatClient:
    """Shared machinery: per-loop HTTP clients, retries, cache, counters."""

    what = "service"

    def __init__(self, base_url: str, model: str = "", *, api_key: str | None = None,
                 api_key_env: str = "OPENAI_API_KEY", concurrency: int = 16, timeout: float = 60.0,
                 max_retries: int = 4, backoff: float = 0.5, backoff_max: float = 8.0, temperature: float = 0.0,
                 max_tokens: int = 1024, cache: str | None = None, check_timeout: float = 5.0,
                 extra_body: dict[str, Any] | None = None, seed: int | None = None):
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0, got {timeout}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        self.base_url = normalize_base_url(base_url)
        self.chat_url = self.base_url + "/v1/chat/completions"
        self.model = model
        key = api_key if api_key is not None else (os.environ.get(api_key_env, "") if api_key_env else "")
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.concurrency, self.timeout, self.max_retries = concurrency, float(timeout), max_retries
        self.backoff, self.backoff_max = backoff, backoff_max
        self.temperature, self.max_tokens = temperature, max_tokens
        self.check_timeout = check_timeout
        self.extra_body = dict(extra_body or {})
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._stats = {"calls": 0, "requests": 0, "retries": 0, "failures": 0, "cache_hits": 0, "seconds": 0.0}
        self._clients: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # loop -> _Slots
        self._loop_thread: _LoopThread | None = None
        self._finalizer: weakref.finalize | None = None
        self._checked = False
        self.cache_path = cache if cache and cache != "memory" else None
        self._cache: dict[str, str] | None = {} if cache else None
        self._torn = False
        if self.cache_path and os.path.exists(self.cache_path):
            with open(self.cache_path) as fh:
                text = fh.read()
            for line in text.splitlines():
                try:
                    row = json.loads(line)
                    self._cache[row["key"]] = row["content"]
                except (ValueError, KeyError, TypeError):
                    continue                               # a torn last line from an interrupted run
            self._torn = bool(text) and not text.endswith("\n")

    # --- configuration ------------------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, section, **overrides):
        """Build from a config section with the fields of ``docs/serving.md`` (missing fields keep defaults)."""
        names = ("base_url", "model", "api_key_env", "concurrency", "timeout", "max_retries", "temperature",
                 "max_tokens", "cache", "think")
        kw = {n: getattr(section, n) for n in names if hasattr(section, n)}
        if "think" in kw and cls is not OpenAIReasoner:
            kw.pop("think")
        kw.update(overrides)
        return cls(**kw)

    # --- counters -----------------------------------------------------------------------------------------------
    def _count(self, key: str, n: float = 1) -> None:
        with self._lock:
            self._stats[key] += n

    def stats(self) -> dict[str, float]:
        """Counters since construction: calls, requests (HTTP attempts), retries, failures, cache_hits, seconds."""
        with self._lock:
            out = dict(self._stats)
        out["seconds"] = round(out["seconds"], 4)
        return out

    # --- fail fast ----------------------------------------------------------------------------------------------
    def check(self) -> _ChatClient:
        """Probe ``/v1/models`` (then ``/health``) with a short timeout. Raises ``ConnectionError`` naming the URL
        when the service cannot be reached, ``ValueError`` when it does not serve ``model`` or reports a
        ``max_model_len`` (vLLM does) that ``max_tokens`` does not fit in. Returns ``self``; with
        an empty ``model`` the first served model is used."""
        url = self.base_url + "/v1/models"
        try:
            with httpx.Client(timeout=self.check_timeout, headers=self.headers) as c:
                r = c.get(url)
                if r.status_code == 404:
                    url = self.base_url + "/health"
                    r = c.get(url)
        except httpx.TimeoutException as e:
            raise ConnectionError(f"{self.what} at {url} did not answer within {self.check_timeout:g}s "
                                  f"({type(e).__name__}); is the server up?") from None
        except httpx.HTTPError as e:
            raise ConnectionError(
                f"{self.what} at {url} is not reachable ({type(e).__name__}: {e}); start it "
                f"(e.g. `vllm serve MODEL --port PORT` or `acrl serve ...`) or fix base_url") from None
        if r.status_code in (401, 403):
            raise ConnectionError(f"{self.what} at {url} refused the API key (HTTP {r.status_code}); set the "
                                  f"environment variable named by api_key_env")
        if r.status_code >= 400:
            raise ConnectionError(f"{self.what} at {url} answered HTTP {r.status_code}: {r.text[:200]}")
        if url.endswith("/v1/models"):
            try:
                models = {m["id"]: m for m in r.json().get("data", [])}
            except (ValueError, KeyError, TypeError, AttributeError):
                models = {}
            if models and not self.model:
                self.model = next(iter(models))
            elif models and self.model not in models:
                raise ValueError(f"{self.what} at {self.base_url} does not serve model {self.model!r}; "
                                 f"it serves {list(models)}")
            limit = models.get(self.model, {}).get("max_model_len")
            if isinstance(limit, int) and self.max_tokens >= limit:   # vLLM answers each such request HTTP 400
                raise ValueError(f"{self.what} at {self.base_url} serves {self.model!r} with max_model_len {limit}: "
                                 f"max_tokens={self.max_tokens} leaves no room for the prompt; set max_tokens below "
                                 f"{limit} (e.g. {limit // 2}) or start the server with a longer --max-model-len")
        self._checked = True
        return self

    # --- event loops --------------------------------------------------------------------------------------------
    def _slots(self) -> _Slots:
        """This event loop's HTTP clients and concurrency slots (created on first use in each loop)."""
        loop = asyncio.get_running_loop()
        slots = self._clients.get(loop)
        if slots is None:
            slots = self._clients[loop] = _Slots(self.concurrency, self.timeout, self.headers)
        return slots

    def _run(self, coro):
        lt = self._loop_thread
        if lt is None or lt.pid != os.getpid() or not lt.thread.is_alive():
            with self._lock:
                lt = self._loop_thread
                if lt is None or lt.pid != os.getpid() or not lt.thread.is_alive():
                    lt = self._loop_thread = _LoopThread()
                    self._finalizer = weakref.finalize(self, lt.shutdown, self._clients)
        return lt.run(coro)

    def close(self) -> None:
        """Close the HTTP clients and stop the private loop (the object can still be used afterwards)."""
        self._loop_thread = None
        fin, self._finalizer = self._finalizer, None
        if fin is not None:
            fin()

    async def aclose(self) -> None:
        """Close the HTTP clients bound to the running event loop (after using ``acomplete``/``aanswer``)."""
        await _aclose(self._clients.pop(asyncio.get_running_loop(), None))

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- requests -----------------------------------------------------------------------------------------------
    def _body(self, messages: list[dict]) -> dict:
        body = {"model": self.model, "messages": messages, "temperature": self.temperature,
                "max_tokens": self.max_tokens}
        body.update(self.extra_body)
        return body

    def _cache_key(self, body: dict) -> str | None:
        if self._cache is None or body.get("temperature", 1.0) != 0:
            return None
        return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()

    def _cache_put(self, key: str, content: str) -> None:
        with self._lock:
            self._cache[key] = content
            if self.cache_path:
                os.makedirs(os.path.dirname(os.path.abspath(self.cache_path)), exist_ok=True)
                with open(self.cache_path, "a") as fh:
                    fh.write(("\n" if self._torn else "") + json.dumps({"key": key, "content": content}) + "\n")
                self._torn = False

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        d = min(self.backoff_max, self.backoff * 2 ** attempt)
        with self._lock:
            d *= 0.5 + self._rng.random()                     # jitter: spread the retries of a burst
        if retry_after is not None:
            d = max(d, min(retry_after, self.backoff_max))
        return d

    async def _attempt(self, client: httpx.AsyncClient, body: dict) -> str:
        try:
            r = await asyncio.wait_for(client.post(self.chat_url, json=body), self.timeout)
        except (TimeoutError, httpx.TimeoutException):
            raise _Retryable(f"timed out after {self.timeout:g}s") from None
        except httpx.TransportError as e:
            raise _Retryable(f"{type(e).__name__}: {e or 'connection error'}") from None
        if r.status_code == 429 or r.status_code >= 500:
            ra = r.headers.get("retry-after")
            try:
                ra = float(ra) if ra is not None else None
            except ValueError:
                ra = None
            raise _Retryable(f"HTTP {r.status_code}: {r.text[:200]}", r.status_code, ra)
        if r.status_code >= 400:
            raise ServiceError(f"POST {self.chat_url} failed with HTTP {r.status_code} (not retried): "
                               f"{r.text[:300]}", self.chat_url, r.status_code)
        try:
            msg = r.json()["choices"][0]["message"]
            content = msg.get("content")
            reasoning = msg.get("reasoning_content") or msg.get("reasoning")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            raise _Retryable(f"HTTP {r.status_code} with a malformed body: {r.text[:200]!r}", r.status_code) from None
        if content is not None and not isinstance(content, str):
            raise _Retryable(f"HTTP {r.status_code} with non-text content: {str(content)[:200]!r}", r.status_code)
        content = content or ""
        if isinstance(reasoning, str) and reasoning:          # vLLM's reasoning parser moved the thinking out
            content = f"<think>{reasoning}</think>{content}"
        return content

    async def _request(self, body: dict) -> str | Exception:
        key = self._cache_key(body)
        if key is not None and key in self._cache:
            self._count("cache_hits")
            return self._cache[key]
        slots = self._slots()
        last: _Retryable | None = None
        for attempt in range(self.max_retries + 1):
            if attempt:
                self._count("retries")
                await asyncio.sleep(self._delay(attempt - 1, last.retry_after if last else None))
            client = await slots.acquire()
            self._count("requests")
            try:
                content = await self._attempt(client, body)
            except _Retryable as e:
                last = e
                continue
            except ServiceError as e:
                self._count("failures")
                return e
            finally:
                slots.release(client)
            if key is not None:
                self._cache_put(key, content)
            return content
        self._count("failures")
        n = self.max_retries + 1
        return ServiceError(f"POST {self.chat_url} failed after {n} attempt{'s' * (n > 1)}: {last}",
                            self.chat_url, last.status if last else None, n)

    async def _gather(self, bodies: list[dict]) -> list[str | Exception]:
        t = time.perf_counter()
        try:
            if not self._checked and self._needs_network(bodies):
                await asyncio.get_running_loop().run_in_executor(None, self.check)
                bodies = [{**b, "model": self.model} for b in bodies]
            self._count("calls")
            return list(await asyncio.gather(*(self._request(b) for b in bodies)))
        finally:
            self._count("seconds", time.perf_counter() - t)

    def _needs_network(self, bodies: list[dict]) -> bool:
        return any((k := self._cache_key(b)) is None or k not in self._cache for b in bodies)


class OpenAIReasoner(_ChatClient):
    """``acrl.rollout.protocols.Reasoner`` over ``/v1/chat/completions``.

    ``think``: ``strip`` removes ``<think>...</think>`` (and a reasoning parser's separate reasoning field) from the
    returned text; ``keep`` returns it (the episode parser ignores thinking either way). ``system``: an optional
    system message sent before each prompt. ``few_shot``: that many worked demonstrations of the protocol
    (:func:`acrl.rollout.prompts.few_shot_messages`) as earlier turns.
    """

    what = "reasoner service"

    def __init__(self, base_url: str, model: str = "", *, think: str = "strip", system: str | None = None,
                 few_shot: int = 0, **kw):
        if think not in THINK_MODES:
            raise ValueError(f"think must be one of {THINK_MODES}, got {think!r}")
        super().__init__(base_url, model, **kw)
        self.think, self.system, self.few_shot = think, system, few_shot

    def _messages(self, prompt: str) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + few_shot_messages(prompt, self.few_shot) + [{"role": "user", "content": prompt}]

    def _post(self, reply: str | Exception) -> str | Exception:
        if isinstance(reply, Exception) or self.think == "keep":
            return reply
        return strip_thinking(reply)

    async def acomplete(self, prompts: Sequence[str]) -> list[str | Exception]:
        out = await self._gather([self._body(self._messages(p)) for p in prompts])
        return [self._post(r) for r in out]

    def complete(self, prompts: list[str]) -> list[str | Exception]:
        if not prompts:
            return []
        return self._run(self.acomplete(prompts))


def image_data_url(image) -> str:
    """A PIL image as a ``data:image/png;base64,...`` URL."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


class OpenAIClarifier(_ChatClient):
    """``acrl.rollout.protocols.Clarifier`` over a VLM's ``/v1/chat/completions``: image part + ``clarify_prompt``
    text."""

    what = "clarifier service"

    def __init__(self, base_url: str, model: str = "", **kw):
        kw.setdefault("max_tokens", 64)
        super().__init__(base_url, model, **kw)

    @staticmethod
    def messages(image, question: str) -> list[dict]:
        return [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": image_data_url(image)}},
            {"type": "text", "text": clarify_prompt(question)},
        ]}]

    async def aanswer(self, images, questions: Sequence[str]) -> list[str | Exception]:
        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images but {len(questions)} questions")
        out = await self._gather([self._body(self.messages(im, q)) for im, q in zip(images, questions)])
        return [r if isinstance(r, Exception) else strip_thinking(r) for r in out]

    def answer(self, images, questions: list[str]) -> list[str | Exception]:
        if not questions:
            return []
        return self._run(self.aanswer(images, questions))
