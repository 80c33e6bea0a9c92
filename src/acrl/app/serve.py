"""``acrl serve``: the reasoner or the clarifier as an OpenAI-compatible HTTP service (standard library only).

Endpoints: ``POST /v1/chat/completions``, ``GET /v1/models``, ``GET /health``. Backends:

- ``world``: :class:`acrl.world.reasoner.WorldReasoner`; the prompt is the text of the last user message.
- ``hf``: :class:`acrl.backends.hf.reasoner.HFReasoner`, a local Hugging Face causal LM (the whole conversation
  goes through the tokenizer's chat template); concurrent requests are batched.
- ``clarifier``: a :class:`acrl.backends.tiny.TinyCaptioner` checkpoint answering clarification questions; the
  image comes as a base64 ``image_url`` data URL, the question from the text part
  (``acrl.rollout.prompts.clarify_prompt``
  format, or the bare question).

Fault injection (for testing clients): a fraction of chat requests answers HTTP 500 (``fail_rate``), sleeps past
the client's timeout (``timeout_rate``) or returns an invalid JSON body (``malformed_rate``). The draw is
deterministic: it depends on ``seed``, the request body and how many times that body was seen before, so a retried
request gets a fresh draw while the same run of requests always meets the same faults.

Usage::

    acrl serve reasoner --backend world --port 8001
    acrl serve reasoner --backend hf --model PATH --port 8001
    acrl serve clarifier --captioner PATH --port 8002

(``python -m acrl.app.serve ...`` works the same.) In tests: ``server, thread, url = start_server(WorldBackend())``.
"""

from __future__ import annotations

import argparse
import base64
import errno
import hashlib
import io
import json
import os
import queue
import random
import re
import socket
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

from acrl.backends.hf.reasoner import HFReasoner
from acrl.backends.tiny import TinyCaptioner
from acrl.rollout.prompts import CLARIFY_PROMPT
from acrl.world.reasoner import WorldReasoner

MAX_BODY = 64 << 20     # bytes of one request body (a few large base64 images); more is answered 413

# --- backends ----------------------------------------------------------------------------------------------------

@dataclass
class Completion:
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reasoning: str | None = None       # sent as ``reasoning_content`` (as vLLM's reasoning parsers do)


class BadRequest(ValueError):
    """The request cannot be served (HTTP 400)."""


class Backend(Protocol):
    """What the server calls: a batch of request bodies in, one :class:`Completion` per body out.

    ``prepare`` validates one body and returns what ``run`` needs (raising :class:`BadRequest` when invalid);
    it runs on the request thread, ``run`` under the server's lock (or in its batcher)."""

    name: str
    max_batch: int

    def prepare(self, body: dict) -> Any: ...

    def run(self, items: list[Any]) -> list[Completion]: ...


def _text_of(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        if not all(isinstance(t, str) for t in texts):
            raise BadRequest("a text part's 'text' must be a string")
        return "\n".join(texts)
    raise BadRequest("message content must be a string or a list of parts")


def last_user_text(messages) -> str:
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list")
    for m in reversed(messages):
        if isinstance(m, dict) and m.get("role") == "user":
            return _text_of(m.get("content"))
    raise BadRequest("no user message")


def _words(text: str) -> int:
    return len(text.split())


class WorldBackend:
    """The deterministic world reasoner (fast; no batching needed)."""

    max_batch = 1

    def __init__(self, read_budget: int = 6, name: str = "world"):
        self.reasoner, self.name = WorldReasoner(read_budget=read_budget), name

    def prepare(self, body: dict) -> str:
        return last_user_text(body.get("messages"))

    def run(self, items: list[str]) -> list[Completion]:
        return [Completion(t, _words(p), _words(t)) for p, t in zip(items, self.reasoner.complete(items))]


class HFBackend:
    """A local Hugging Face text LLM; requests arriving together are generated as one batch."""

    def __init__(self, reasoner, name: str = ""):
        self.reasoner = reasoner
        self.name = name or getattr(reasoner, "name", "hf")
        self.max_batch = max(1, reasoner.batch_size)

    def prepare(self, body: dict) -> tuple:
        msgs = body.get("messages")
        last_user_text(msgs)                                   # validates
        if not all(isinstance(m, dict) for m in msgs):
            raise BadRequest("every message must be an object")
        conv = [{"role": m.get("role", "user"), "content": _text_of(m.get("content"))} for m in msgs]
        temp = body.get("temperature")
        mx = body.get("max_tokens") or body.get("max_completion_tokens")
        if temp is not None and not isinstance(temp, (int, float)):
            raise BadRequest("temperature must be a number")
        if mx is not None and (not isinstance(mx, int) or mx < 1):
            raise BadRequest("max_tokens must be a positive integer")
        return conv, temp, mx

    def run(self, items: list[tuple]) -> list[Completion]:
        out: list[Completion | None] = [None] * len(items)
        groups: dict[tuple, list[int]] = {}
        for i, (_, temp, mx) in enumerate(items):
            groups.setdefault((temp, mx), []).append(i)
        for (temp, mx), idx in groups.items():
            res = self.reasoner.chat([items[i][0] for i in idx], max_new_tokens=mx, temperature=temp)
            for i, (text, pt, ct) in zip(idx, res):
                out[i] = Completion(text, pt, ct)
        return out


_CLARIFY_RE = re.compile(re.escape(CLARIFY_PROMPT.split("{question}")[0]) + r"(.*)", re.DOTALL)


def decode_image(url: str):
    """A PIL image from a ``data:image/...;base64,...`` URL (remote URLs are not fetched)."""
    from PIL import Image

    if not isinstance(url, str) or not url.startswith("data:") or ";base64," not in url:
        raise BadRequest("image_url must be a base64 data URL (data:image/png;base64,...)")
    try:
        img = Image.open(io.BytesIO(base64.b64decode(url.split(";base64,", 1)[1], validate=True)))
        return img.convert("RGB")
    except Exception as e:  # noqa: BLE001 - any decoding problem is the client's
        raise BadRequest(f"cannot decode the image: {type(e).__name__}: {e}") from None


class ClarifierBackend:
    """The reference captioner's ``answer`` (a TinyCaptioner checkpoint) behind the chat endpoint."""

    def __init__(self, captioner, name: str = "clarifier", max_batch: int = 32):
        self.captioner, self.name, self.max_batch = captioner, name, max_batch

    @classmethod
    def load(cls, path: str, name: str = "", max_batch: int = 32) -> ClarifierBackend:
        return cls(TinyCaptioner.load(path), name or os.path.basename(os.path.normpath(path)), max_batch)

    def prepare(self, body: dict) -> tuple:
        msgs = body.get("messages")
        last_user_text(msgs)
        user = [m for m in msgs if isinstance(m, dict) and m.get("role") == "user"][-1]
        parts = user.get("content") if isinstance(user.get("content"), list) else []
        images = [p.get("image_url") for p in parts if isinstance(p, dict) and p.get("type") == "image_url"]
        if len(images) != 1:
            raise BadRequest(f"the last user message needs exactly one image_url part, got {len(images)}")
        url = images[0].get("url") if isinstance(images[0], dict) else images[0]
        text = _text_of(user["content"]).strip()
        m = _CLARIFY_RE.match(text)
        return decode_image(url), (m.group(1).strip() if m else text)

    def run(self, items: list[tuple]) -> list[Completion]:
        answers = self.captioner.answer([im for im, _ in items], [q for _, q in items])
        return [Completion(a, _words(q), _words(a)) for (_, q), a in zip(items, answers)]


# --- faults ------------------------------------------------------------------------------------------------------

class Faults:
    """Deterministic fault injection: one uniform draw per (seed, body, occurrence of that body)."""

    def __init__(self, fail_rate: float = 0.0, timeout_rate: float = 0.0, malformed_rate: float = 0.0,
                 seed: int = 0, sleep: float = 2.0):
        if min(fail_rate, timeout_rate, malformed_rate) < 0 or fail_rate + timeout_rate + malformed_rate > 1:
            raise ValueError("fault rates must be >= 0 and sum to at most 1")
        self.fail_rate, self.timeout_rate, self.malformed_rate = fail_rate, timeout_rate, malformed_rate
        self.seed, self.sleep = seed, sleep
        self._seen: dict[str, int] = {}
        self._lock = threading.Lock()
        self.counts = {"fail": 0, "timeout": 0, "malformed": 0}

    @property
    def active(self) -> bool:
        return self.fail_rate + self.timeout_rate + self.malformed_rate > 0

    def draw(self, raw: bytes) -> str | None:
        if not self.active:
            return None
        key = hashlib.sha256(raw).hexdigest()
        with self._lock:
            k = self._seen.get(key, 0)
            self._seen[key] = k + 1
        u = random.Random(f"{self.seed}:{key}:{k}").random()
        kind = None
        if u < self.fail_rate:
            kind = "fail"
        elif u < self.fail_rate + self.timeout_rate:
            kind = "timeout"
        elif u < self.fail_rate + self.timeout_rate + self.malformed_rate:
            kind = "malformed"
        if kind:
            with self._lock:
                self.counts[kind] += 1
        return kind


# --- batching ----------------------------------------------------------------------------------------------------

class _Batcher:
    """Collects requests that arrive within ``wait`` seconds (up to ``max_batch``) into one backend call."""

    def __init__(self, fn, max_batch: int, wait: float):
        self.fn, self.max_batch, self.wait = fn, max_batch, wait
        self.q: queue.Queue = queue.Queue()
        threading.Thread(target=self._loop, name="acrl-serve-batcher", daemon=True).start()

    def submit(self, item):
        slot: dict = {"item": item, "done": threading.Event()}
        self.q.put(slot)
        slot["done"].wait()
        if "error" in slot:
            raise slot["error"]
        return slot["result"]

    def _loop(self) -> None:
        while True:
            batch = [self.q.get()]
            deadline = time.monotonic() + self.wait
            while len(batch) < self.max_batch:
                left = deadline - time.monotonic()
                try:
                    batch.append(self.q.get(timeout=left) if left > 0 else self.q.get_nowait())
                except queue.Empty:
                    break
            try:
                results = self.fn([s["item"] for s in batch])
                for s, r in zip(batch, results):
                    s["result"] = r
            except Exception as e:  # noqa: BLE001 - reported to every waiting request as HTTP 500
                for s in batch:
                    s["error"] = e
            for s in batch:
                s["done"].set()


# --- HTTP ----------------------------------------------------------------------------------------------------------

class ChatServer(ThreadingHTTPServer):
    """ThreadingHTTPServer holding a backend, its lock/batcher, fault injection and request counters."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024                                 # the default (5) drops bursts of new connections

    def __init__(self, addr, backend, faults: Faults | None = None, batch_wait: float = 0.005,
                 quiet: bool = True, max_body: int = MAX_BODY):
        super().__init__(addr, _Handler)
        self.max_body = max_body
        self.backend, self.faults, self.quiet = backend, faults or Faults(), quiet
        self.model = backend.name
        self.lock = threading.Lock()
        self.batcher = _Batcher(self._run, backend.max_batch, batch_wait) if backend.max_batch > 1 else None
        self.counts = {"requests": 0, "completions": 0, "errors": 0}
        self._conns: set = set()
        self._conns_lock = threading.Lock()

    def _run(self, items):
        with self.lock:
            return self.backend.run(items)

    def generate(self, item) -> Completion:
        if self.batcher is not None:
            return self.batcher.submit(item)
        return self._run([item])[0]

    def count(self, key: str) -> None:
        with self._conns_lock:
            self.counts[key] += 1

    def process_request(self, request, client_address):
        with self._conns_lock:
            self._conns.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self._conns_lock:
            self._conns.discard(request)
        super().shutdown_request(request)

    def kill(self) -> None:
        """Stop like a crashed process: stop accepting, close the listening socket and every open connection."""
        self.shutdown()
        self.server_close()
        with self._conns_lock:
            conns = list(self._conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"                            # keep-alive: clients reuse their connections
    disable_nagle_algorithm = True                            # headers and body are separate small writes
    server: ChatServer

    def log_message(self, fmt, *args):
        if not self.server.quiet:
            super().log_message(fmt, *args)

    def _send(self, status: int, payload: dict | bytes) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except OSError:                                       # the client gave up (e.g. after its timeout)
            self.close_connection = True

    def _error(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        self._send(status, {"error": {"message": message, "type": kind, "code": status}})

    def do_GET(self):
        path = self.path.split("?")[0].rstrip("/")
        if path == "/health":
            self._send(200, {"status": "ok", "model": self.server.model})
        elif path == "/v1/models":
            self._send(200, {"object": "list", "data": [
                {"id": self.server.model, "object": "model", "created": 0, "owned_by": "acrl"}]})
        elif path == "/stats":
            self._send(200, {**self.server.counts, "faults": self.server.faults.counts})
        else:
            self._error(404, f"no route GET {self.path}")

    def do_POST(self):
        path = self.path.split("?")[0].rstrip("/")
        try:
            length = int(self.headers.get("Content-Length") or 0)
            if length < 0:
                raise ValueError
        except ValueError:
            self.close_connection = True
            self._error(400, "invalid Content-Length")
            return
        if length > self.server.max_body:        # refused unread: the connection is closed after the answer
            self.close_connection = True
            self._error(413, f"request body of {length} bytes is over the limit of {self.server.max_body}")
            return
        raw = self.rfile.read(length) if length > 0 else b""
        if path != "/v1/chat/completions":
            self._error(404, f"no route POST {self.path}")
            return
        srv = self.server
        srv.count("requests")
        fault = srv.faults.draw(raw)
        if fault == "fail":
            self._error(500, "injected server error", "server_error")
            return
        if fault == "timeout":
            time.sleep(srv.faults.sleep)
        try:
            body = json.loads(raw)
            if not isinstance(body, dict):
                raise BadRequest("the body must be a JSON object")
            model = body.get("model")
            if model and model != srv.model:
                self._error(404, f"The model `{model}` does not exist (served: {srv.model}).", "NotFoundError")
                return
            if body.get("stream"):
                raise BadRequest("stream=true is not supported")
            if body.get("n", 1) != 1:
                raise BadRequest("only n=1 is supported")
            item = srv.backend.prepare(body)
        except RecursionError:
            self._error(400, "bad request: the JSON body is nested too deeply")
            return
        except (ValueError, TypeError, AttributeError, KeyError, IndexError) as e:   # a malformed body: the client's
            self._error(400, f"bad request: {e}")
            return
        try:
            comp = srv.generate(item)
        except Exception as e:  # noqa: BLE001 - a backend failure is the server's (HTTP 500)
            srv.count("errors")
            self._error(500, f"{type(e).__name__}: {e}", "server_error")
            return
        srv.count("completions")
        if fault == "malformed":
            self._send(200, b'{"id": "chatcmpl-broken", "choices": [{"message": {"content": "SOL')
            return
        message = {"role": "assistant", "content": comp.text}
        if comp.reasoning is not None:
            message["reasoning_content"] = comp.reasoning
        self._send(200, {
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": srv.model,
            "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": comp.prompt_tokens, "completion_tokens": comp.completion_tokens,
                      "total_tokens": comp.prompt_tokens + comp.completion_tokens},
        })


def make_server(backend, host: str = "127.0.0.1", port: int = 0, *, fail_rate: float = 0.0,
                timeout_rate: float = 0.0, malformed_rate: float = 0.0, seed: int = 0, fault_sleep: float = 2.0,
                batch_wait: float = 0.005, quiet: bool = True, max_body: int = MAX_BODY) -> ChatServer:
    """The server, bound; a port that is taken or cannot be bound is a one-line error naming --host / --port."""
    if not 0 <= port <= 65535:
        raise ValueError(f"--port {port} must be between 0 and 65535")
    faults = Faults(fail_rate, timeout_rate, malformed_rate, seed, fault_sleep)
    try:
        return ChatServer((host, port), backend, faults, batch_wait=batch_wait, quiet=quiet, max_body=max_body)
    except (socket.gaierror, UnicodeError) as e:
        raise ValueError(f"--host {host!r} is not an address this machine has ({e})") from None
    except OSError as e:
        why = "is already in use" if e.errno == errno.EADDRINUSE else f"cannot be bound ({e.strerror or e})"
        raise ValueError(f"--host {host} --port {port}: the address {why}; choose another --port") from None


def start_server(backend, host: str = "127.0.0.1", port: int = 0, **kw) -> tuple[ChatServer, threading.Thread, str]:
    """Serve ``backend`` in a daemon thread. Returns ``(server, thread, url)``; ``url`` ends in ``/v1``.
    Stop with ``server.shutdown(); server.server_close()`` (or ``server.kill()`` to drop open connections too)."""
    server = make_server(backend, host, port, **kw)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True,
                              name="acrl-serve")
    thread.start()
    h, p = server.server_address[:2]
    return server, thread, f"http://{h}:{p}/v1"


# --- command line ------------------------------------------------------------------------------------------------

def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: all interfaces)")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free port, printed at start)")
    p.add_argument("--served-model-name", default="", help="model id reported by /v1/models and required in "
                                                            "requests (default: world, or the checkpoint's name)")
    p.add_argument("--batch-wait", type=float, default=0.005, help="seconds to collect concurrent requests into "
                                                                   "one batch")
    p.add_argument("--verbose", action="store_true", help="log every request")
    p.add_argument("--max-body-mb", type=float, default=MAX_BODY / (1 << 20),
                   help="largest request body in MiB (larger ones are answered 413)")
    g = p.add_argument_group("fault injection (for testing clients)")
    g.add_argument("--fail-rate", type=float, default=0.0, help="fraction of chat requests answered with HTTP 500")
    g.add_argument("--timeout-rate", type=float, default=0.0, help="fraction that sleeps --fault-sleep seconds")
    g.add_argument("--malformed-rate", type=float, default=0.0, help="fraction answered with an invalid JSON body")
    g.add_argument("--fault-sleep", type=float, default=2.0, help="seconds a 'timeout' request sleeps")
    g.add_argument("--fault-seed", type=int, default=0, help="seed of the fault draws")


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``serve reasoner`` and ``serve clarifier`` on an argparse subparsers object (``acrl serve ...``)."""
    p = subparsers.add_parser("serve", help="serve the reasoner or the clarifier over an OpenAI-compatible API")
    sub = p.add_subparsers(dest="serve_command", required=True, metavar="SERVICE")
    r = sub.add_parser("reasoner", help="a text-only reasoner: POST /v1/chat/completions")
    r.add_argument("--backend", choices=["world", "hf"], default="world",
                   help="world: the deterministic world reasoner; hf: a local Hugging Face causal LM")
    r.add_argument("--model", default="", help="hf: model directory or hub id (loaded from the local cache)")
    r.add_argument("--read-budget", type=int, default=6, help="world: statements of a caption it reads")
    r.add_argument("--max-new-tokens", type=int, default=1024, help="hf: default max_tokens of a request")
    r.add_argument("--temperature", type=float, default=0.0, help="hf: default temperature (0: greedy)")
    r.add_argument("--batch-size", type=int, default=8, help="hf: largest generation batch")
    r.add_argument("--think", choices=["strip", "keep"], default="keep",
                   help="hf: strip or keep <think>...</think> in the returned text")
    r.add_argument("--device", default=None, help="hf: torch device (default: cuda if available, else cpu)")
    r.add_argument("--dtype", default="auto", help="hf: torch dtype (auto, bfloat16, float16, float32)")
    _add_common(r)
    r.set_defaults(fn=cmd_serve)
    c = sub.add_parser("clarifier", help="the reference captioner answering clarification questions from images")
    c.add_argument("--captioner", required=True, help="TinyCaptioner checkpoint directory")
    c.add_argument("--batch-size", type=int, default=32, help="largest answering batch")
    c.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    _add_common(c)
    c.set_defaults(fn=cmd_serve)
    return p


# flag -> (lowest allowed value, what it must be); checked before anything is loaded
_LIMITS = {"port": (0, "between 0 and 65535"), "batch_size": (1, "at least 1"), "batch_wait": (0, ">= 0"),
           "fault_sleep": (0, ">= 0"), "read_budget": (1, "at least 1"), "max_new_tokens": (1, "at least 1"),
           "threads": (0, ">= 0"), "temperature": (0, ">= 0")}


def check_args(args) -> None:
    """One-line errors naming the flag for values no server can use."""
    for key, (low, what) in _LIMITS.items():
        v = getattr(args, key, None)
        if v is not None and (v < low or (key == "port" and v > 65535) or v != v):
            raise ValueError(f"--{key.replace('_', '-')} {v} must be {what}")
    rates = {"--fail-rate": args.fail_rate, "--timeout-rate": args.timeout_rate,
             "--malformed-rate": args.malformed_rate}
    if min(rates.values()) < 0 or sum(rates.values()) > 1:
        raise ValueError(f"{' '.join(f'{k} {v}' for k, v in rates.items())}: fault rates must be >= 0 and sum to "
                         f"at most 1")
    if args.max_body_mb <= 0:
        raise ValueError(f"--max-body-mb {args.max_body_mb} must be > 0")


def _looks_local(name: str) -> bool:
    """A path, not a hub id (``org/name``): absolute, relative with ./ or ~, or more than one '/'."""
    return os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1


def build_backend(args):
    check_args(args)
    if args.serve_command == "clarifier":
        if not os.path.isdir(args.captioner):
            raise FileNotFoundError(f"--captioner {args.captioner}: no such checkpoint directory")
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        try:
            return ClarifierBackend.load(args.captioner, args.served_model_name, max_batch=args.batch_size)
        except (OSError, RuntimeError, KeyError, ValueError, TypeError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ValueError(f"--captioner {args.captioner}: not a loadable captioner checkpoint ({first})") from None
    if args.backend == "world":
        return WorldBackend(args.read_budget, args.served_model_name or "world")
    if not args.model:
        raise ValueError("--backend hf needs --model PATH")
    if not os.path.isdir(args.model):
        if _looks_local(args.model):
            raise FileNotFoundError(f"--model {args.model}: no such directory")
        from huggingface_hub import try_to_load_from_cache

        try:
            cached = try_to_load_from_cache(args.model, "config.json")
        except ValueError:      # not a valid repo id either
            cached = None
        if not isinstance(cached, str):
            raise FileNotFoundError(f"--model {args.model}: neither a local directory nor a model in the local "
                                    f"Hugging Face cache (download it first, e.g. huggingface-cli download "
                                    f"{args.model})")

    try:
        hf = HFReasoner(args.model, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                        batch_size=args.batch_size, think=args.think, device=args.device, dtype=args.dtype)
    except OSError as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        where = "a directory without a model" if os.path.isdir(args.model) else \
            "neither a local directory nor a model in the local Hugging Face cache"
        raise ValueError(f"--model {args.model}: {where} ({first})") from None
    return HFBackend(hf, args.served_model_name or args.model)


def cmd_serve(args) -> int:
    backend = build_backend(args)
    server = make_server(backend, args.host, args.port, fail_rate=args.fail_rate, timeout_rate=args.timeout_rate,
                         malformed_rate=args.malformed_rate, seed=args.fault_seed, fault_sleep=args.fault_sleep,
                         batch_wait=args.batch_wait, quiet=not args.verbose,
                         max_body=int(args.max_body_mb * (1 << 20)))
    h, p = server.server_address[:2]
    print(f"serving {args.serve_command} model {server.model!r} at http://{h}:{p}/v1", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m acrl.app.serve reasoner|clarifier ...`` (the same as ``acrl serve ...``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] != ["serve"]:
        argv = ["serve"] + argv
    parser = argparse.ArgumentParser(prog="acrl")
    add_serve_parser(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"acrl serve: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"acrl serve: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
