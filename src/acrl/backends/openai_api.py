"""Reasoner and clarifier behind an OpenAI-compatible ``/v1/chat/completions`` endpoint (vLLM, ``acrl serve``, ...).

- :class:`OpenAIReasoner` implements ``acrl.rollout.protocols.Reasoner``: one chat completion per prompt (the prompt is
  the single user message), all requests of a call issued concurrently, at most ``concurrency`` in flight.
- :class:`OpenAIClarifier` implements ``acrl.rollout.protocols.Clarifier``: the image travels as a base64 PNG
  ``image_url`` data URL next to the text of ``acrl.rollout.prompts.clarify_prompt(question)`` (the format vLLM's VLM
  servers accept).

Requests go through the ``openai`` SDK's ``AsyncOpenAI`` (one per event loop, its connection pool capped at
``concurrency``). Failure handling is the SDK's: connection errors, timeouts (``timeout`` per attempt), HTTP 408,
409, 429 and 5xx are retried ``max_retries`` times with exponential backoff (0.5 s doubling to 8 s, jittered, or the
server's ``Retry-After`` up to 2 minutes); other 4xx are not. A ``200`` whose body is not a chat completion with text
content is retried as well (:func:`_check_completion` turns it into a decoding error, which the SDK retries like a
dropped connection). A request that still fails becomes a :class:`ServiceError` instance in its slot (the episode is
then ``failed``); a single failed request never raises. ``check()`` fails fast with a ``ConnectionError`` naming the
URL when nothing listens there.

``complete``/``answer`` are synchronous: they run the requests on a private event loop in a daemon thread, so they
work from any thread, including one that runs its own event loop. ``acomplete``/``aanswer`` are the coroutine
versions for callers that already are async.

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
import threading
import time
import weakref
from collections.abc import Sequence
from typing import Any

import httpx2
import openai

from acrl.rollout.grading import strip_think
from acrl.rollout.prompts import clarify_prompt, few_shot_messages

THINK_MODES = ("strip", "keep")
NO_KEY = "EMPTY"   # sent when no API key is set: the SDK needs one, servers without --api-key ignore it
RETRY_HEADER = "x-stainless-retry-count"   # the SDK numbers the attempts of a request in this header (0: the first)
TYPED = ("model", "messages", "temperature", "max_tokens")   # body fields the SDK takes by name; the rest: extra_body


def strip_thinking(text: str) -> str:
    """Remove R1-style reasoning (see :func:`acrl.rollout.grading.strip_think`) and surrounding whitespace."""
    return strip_think(text).strip()


class ServiceError(RuntimeError):
    """A request that failed after its retries. ``url``, ``status`` (None: no HTTP response) and ``attempts``."""

    def __init__(self, message: str, url: str, status: int | None = None, attempts: int = 1):
        super().__init__(message)
        self.url, self.status, self.attempts = url, status, attempts


def normalize_base_url(url: str) -> str:
    """``http://host:8000``, ``http://host:8000/`` and ``http://host:8000/v1`` all mean the same server."""
    url = (url or "").strip().rstrip("/")
    if not url:
        raise ValueError("base_url is empty: set the service URL, e.g. http://127.0.0.1:8000/v1")
    if "://" not in url:
        url = "http://" + url
    url = url.removesuffix("/v1")
    return url


def api_key_from(api_key: str | None, api_key_env: str | None) -> str:
    """``api_key``, else the environment variable named ``api_key_env``, else :data:`NO_KEY`."""
    key = api_key if api_key is not None else (os.environ.get(api_key_env, "") if api_key_env else "")
    return key or NO_KEY


async def _check_completion(response: httpx2.Response) -> None:
    """Response hook: a ``200`` from ``/chat/completions`` whose body is not a chat completion with text content
    raises ``httpx2.DecodingError``, which the SDK retries like a dropped connection."""
    if response.status_code != 200 or not response.request.url.path.endswith("/chat/completions"):
        return
    await response.aread()
    try:
        message = json.loads(response.content)["choices"][0]["message"]
        ok = isinstance(message.get("content"), str | None)
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        ok = False
    if not ok:
        raise httpx2.DecodingError(f"HTTP 200 with a malformed body: {response.text[:200]!r}",
                                   request=response.request)


class _Counters:
    """Thread-safe counters; :meth:`on_request` is the HTTP client's request hook (every attempt, retries too)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.values = {"calls": 0, "requests": 0, "retries": 0, "failures": 0, "cache_hits": 0, "seconds": 0.0}

    def add(self, key: str, n: float = 1) -> None:
        with self.lock:
            self.values[key] += n

    async def on_request(self, request: httpx2.Request) -> None:
        self.add("requests")
        if request.headers.get(RETRY_HEADER, "0") != "0":
            self.add("retries")


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
        """Close this loop's SDK client and stop the loop (also run as the owner's finalizer)."""
        if self.pid != os.getpid():                           # a forked child: the thread is not ours
            return
        client = clients.pop(self.loop, None)
        if self.loop.is_running():
            fut = asyncio.run_coroutine_threadsafe(_aclose(client), self.loop)
            if threading.current_thread() is self.thread:
                fut.add_done_callback(lambda _: self.loop.stop())
                return
            with contextlib.suppress(Exception):              # closing is best effort
                fut.result(timeout=5)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=5)
        if not self.loop.is_running() and not self.loop.is_closed():
            self.loop.close()


async def _aclose(client: openai.AsyncOpenAI | None) -> None:
    if client is not None:
        await client.close()


class _ChatClient:
    """Shared machinery: one SDK client per event loop, the cache, the counters."""

    what = "service"

    def __init__(self, base_url: str, model: str = "", *, api_key: str | None = None,
                 api_key_env: str = "OPENAI_API_KEY", concurrency: int = 16, timeout: float = 60.0,
                 max_retries: int = 4, temperature: float = 0.0, max_tokens: int = 1024, cache: str | None = None,
                 check_timeout: float = 5.0, extra_body: dict[str, Any] | None = None):
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0, got {timeout}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        self.base_url = normalize_base_url(base_url)
        self.chat_url = self.base_url + "/v1/chat/completions"
        self.model = model
        self.api_key = api_key_from(api_key, api_key_env)
        self.concurrency, self.timeout, self.max_retries = concurrency, float(timeout), max_retries
        self.temperature, self.max_tokens = temperature, max_tokens
        self.check_timeout = check_timeout
        self.extra_body = dict(extra_body or {})
        self._lock = threading.Lock()
        self._counters = _Counters()
        self._clients: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # loop -> AsyncOpenAI
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
        self._counters.add(key, n)

    def stats(self) -> dict[str, float]:
        """Counters since construction: calls, requests (HTTP attempts), retries, failures, cache_hits, seconds."""
        with self._counters.lock:
            out = dict(self._counters.values)
        out["seconds"] = round(out["seconds"], 4)
        return out

    # --- fail fast ----------------------------------------------------------------------------------------------
    def check(self) -> _ChatClient:
        """Probe ``/v1/models`` (then ``/health``) with a short timeout. Raises ``ConnectionError`` naming the URL
        when the service cannot be reached, ``ValueError`` when it does not serve ``model`` or reports a
        ``max_model_len`` (vLLM does) that ``max_tokens`` does not fit in. Returns ``self``; with
        an empty ``model`` the first served model is used."""
        url = self.base_url + "/v1/models"
        models: dict[str, Any] = {}
        with openai.OpenAI(base_url=self.base_url + "/v1", api_key=self.api_key, max_retries=0,
                           timeout=self.check_timeout) as client:
            try:
                try:
                    models = {m.id: m for m in client.models.list().data if isinstance(getattr(m, "id", None), str)}
                except openai.NotFoundError:
                    url = self.base_url + "/health"
                    client.get(url, cast_to=httpx2.Response)
                except (ValueError, TypeError, AttributeError):
                    models = {}                                # a body that is not a model list
            except openai.APITimeoutError:
                raise ConnectionError(f"{self.what} at {url} did not answer within {self.check_timeout:g}s; "
                                      f"is the server up?") from None
            except openai.APIConnectionError as e:
                cause = e.__cause__ or e
                raise ConnectionError(
                    f"{self.what} at {url} is not reachable ({type(cause).__name__}: {cause}); start it "
                    f"(e.g. `vllm serve MODEL --port PORT` or `acrl serve ...`) or fix base_url") from None
            except (openai.AuthenticationError, openai.PermissionDeniedError) as e:
                raise ConnectionError(f"{self.what} at {url} refused the API key (HTTP {e.status_code}); set the "
                                      f"environment variable named by api_key_env") from None
            except openai.APIStatusError as e:
                raise ConnectionError(f"{self.what} at {url} answered HTTP {e.status_code}: "
                                      f"{e.response.text[:200]}") from None
        if models and not self.model:
            self.model = next(iter(models))
        elif models and self.model not in models:
            raise ValueError(f"{self.what} at {self.base_url} does not serve model {self.model!r}; "
                             f"it serves {list(models)}")
        limit = getattr(models.get(self.model), "max_model_len", None)
        if isinstance(limit, int) and self.max_tokens >= limit:   # vLLM answers each such request HTTP 400
            raise ValueError(f"{self.what} at {self.base_url} serves {self.model!r} with max_model_len {limit}: "
                             f"max_tokens={self.max_tokens} leaves no room for the prompt; set max_tokens below "
                             f"{limit} (e.g. {limit // 2}) or start the server with a longer --max-model-len")
        self._checked = True
        return self

    # --- event loops --------------------------------------------------------------------------------------------
    def _client(self) -> openai.AsyncOpenAI:
        """This event loop's SDK client (created on first use in each loop). Its pool holds ``concurrency``
        connections and a request waits for a free one without a deadline: that is the cap on requests in
        flight (a retry's backoff holds no connection)."""
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            n = self.concurrency
            http = openai.DefaultAsyncHttpxClient(
                limits=httpx2.Limits(max_connections=n, max_keepalive_connections=n),
                event_hooks={"request": [self._counters.on_request], "response": [_check_completion]})
            client = self._clients[loop] = openai.AsyncOpenAI(
                base_url=self.base_url + "/v1", api_key=self.api_key, max_retries=self.max_retries,
                timeout=openai.Timeout(self.timeout, connect=min(self.timeout, 10.0), pool=None), http_client=http)
        return client

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
        """Close the SDK clients and stop the private loop (the object can still be used afterwards)."""
        self._loop_thread = None
        fin, self._finalizer = self._finalizer, None
        if fin is not None:
            fin()

    async def aclose(self) -> None:
        """Close the SDK client bound to the running event loop (after using ``acomplete``/``aanswer``)."""
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

    def _service_error(self, e: openai.APIError) -> ServiceError:
        """The SDK's exception after its last attempt as a :class:`ServiceError` naming the URL."""
        n = int(e.request.headers.get(RETRY_HEADER, "0")) + 1
        status = e.status_code if isinstance(e, openai.APIStatusError) else None
        if isinstance(e, openai.APIStatusError):
            why = f"HTTP {e.status_code}: {e.response.text[:300]}"
        elif isinstance(e, openai.APITimeoutError):
            why = f"timed out after {self.timeout:g}s"
        else:
            cause = e.__cause__ or e
            why = f"{type(cause).__name__}: {cause or 'connection error'}"
        return ServiceError(f"POST {self.chat_url} failed after {n} attempt{'s' * (n > 1)}: {why}",
                            self.chat_url, status, n)

    async def _request(self, body: dict) -> str | Exception:
        key = self._cache_key(body)
        if key is not None and key in self._cache:
            self._count("cache_hits")
            return self._cache[key]
        try:
            reply = await self._client().chat.completions.create(
                **{k: body[k] for k in TYPED if k in body},
                extra_body={k: v for k, v in body.items() if k not in TYPED})
        except openai.APIError as e:
            self._count("failures")
            return self._service_error(e)
        message = reply.choices[0].message
        content = message.content or ""
        reasoning = getattr(message, "reasoning_content", None) or getattr(message, "reasoning", None)
        if isinstance(reasoning, str) and reasoning:          # vLLM's reasoning parser moved the thinking out
            content = f"<think>{reasoning}</think>{content}"
        if key is not None:
            self._cache_put(key, content)
        return content

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
