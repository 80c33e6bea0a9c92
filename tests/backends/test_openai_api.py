"""The OpenAI-compatible client against real local HTTP servers (``acrl.app.serve``) on 127.0.0.1."""

import asyncio
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from acrl.app.serve import ClarifierBackend, Completion, WorldBackend, last_user_text, start_server
from acrl.backends.openai_api import OpenAIClarifier, OpenAIReasoner, ServiceError, normalize_base_url
from acrl.rollout.prompts import decision_prompt
from acrl.world import make_problems, oracle_caption_for
from acrl.world.reasoner import WorldReasoner


def _stop(server):
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def problems():
    return make_problems("test", 12)


@pytest.fixture(scope="module")
def prompts(problems):
    return [decision_prompt(p.question_with_choices(), oracle_caption_for(p)) for p in problems]


@pytest.fixture(scope="module")
def world():
    server, _, url = start_server(WorldBackend())
    yield url
    _stop(server)


def _completion(text="SOLVED \\boxed{3}") -> bytes:
    return json.dumps({"id": "c", "object": "chat.completion", "created": 0, "model": "m", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]}).encode()


class Scripted(ThreadingHTTPServer):
    """A chat server on 127.0.0.1: POSTs are answered from ``script`` in order (``(status, body, headers,
    seconds to wait first)``), then with a normal completion; every request is held at least ``hold`` seconds.
    Records each POST's arrival time and headers, and the most POSTs it held at once."""

    daemon_threads = True

    def __init__(self, script=(), hold=0.0):
        self.script, self.hold = list(script), hold
        self.lock, self.active, self.most, self.arrivals, self.headers = threading.Lock(), 0, 0, [], []
        super().__init__(("127.0.0.1", 0), _ScriptedHandler)
        threading.Thread(target=self.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server_port}/v1"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        _stop(self)


class _ScriptedHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _send(self, status, body, headers=()):
        self.send_response(status)
        for k, v in dict(headers).items():
            self.send_header(k, v)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self._send(200, json.dumps({"data": [{"id": "m"}]}).encode())

    def do_POST(self):
        self.rfile.read(int(self.headers["content-length"]))
        srv = self.server
        with srv.lock:
            srv.arrivals.append(time.perf_counter())
            srv.headers.append({k.lower(): v for k, v in self.headers.items()})
            srv.active += 1
            srv.most = max(srv.most, srv.active)
            status, body, headers, wait = srv.script.pop(0) if srv.script else (200, _completion(), {}, 0.0)
        time.sleep(max(wait, srv.hold))
        with srv.lock:
            srv.active -= 1
        try:
            self._send(status, body, headers)
        except (BrokenPipeError, ConnectionResetError):
            pass                                                     # the client gave up (its timeout)

    def log_message(self, *args):
        pass


ERROR = json.dumps({"error": {"message": "busy"}}).encode()


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Thinker:
    """Replies with R1-style thinking, inline or (for prompts starting with 'split') in a separate field."""

    name, max_batch = "thinker", 1

    def prepare(self, body):
        return last_user_text(body["messages"])

    def run(self, items):
        return [Completion("SOLVED \\boxed{3}", reasoning="plan") if p.startswith("split")
                else Completion("<think>count the bars</think>\nSOLVED \\boxed{3}") for p in items]


def test_base_url_forms():
    for u in ("http://h:1", "http://h:1/", "http://h:1/v1", "http://h:1/v1/", "h:1"):
        assert normalize_base_url(u) == "http://h:1"


def test_replies_match_the_in_process_reasoner_and_stats(world, prompts):
    r = OpenAIReasoner(world, "world", concurrency=4, timeout=5)
    assert r.complete(prompts) == WorldReasoner().complete(prompts)
    assert r.complete([]) == []
    s = r.stats()
    assert s["requests"] == len(prompts) and s["retries"] == s["failures"] == s["cache_hits"] == 0
    assert s["calls"] == 1 and s["seconds"] > 0
    r.close()
    assert r.complete(prompts[:2]) == WorldReasoner().complete(prompts[:2])   # usable after close


def test_empty_model_takes_the_served_one_and_unknown_model_is_an_error(world):
    r = OpenAIReasoner(world).check()
    assert r.model == "world"
    with pytest.raises(ValueError, match="does not serve model 'nope'"):
        OpenAIReasoner(world, "nope").check()


def test_max_tokens_beyond_the_servers_context_is_refused_before_any_request(prompts):
    """vLLM reports max_model_len in /v1/models and answers HTTP 400 to every request whose max_tokens does not
    fit (the default 4096 against a 2048 server): refused at start, before any request is sent."""
    chats = []

    class VLLMModels(BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"data": [{"id": "smol", "max_model_len": 2048}]}).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self):
            chats.append(self.path)
            self.send_response(400)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), VLLMModels)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/v1"
        with pytest.raises(ValueError, match="max_model_len 2048.*max_tokens=4096"):
            OpenAIReasoner(url, max_tokens=4096).check()
        with pytest.raises(ValueError, match="max_model_len 2048"):
            OpenAIReasoner(url, max_tokens=2048).complete(prompts[:2])
        assert chats == []
        assert OpenAIReasoner(url, max_tokens=1024).check().model == "smol"
    finally:
        _stop(server)


def test_closed_port_fails_fast_naming_the_url():
    url = f"http://127.0.0.1:{_closed_port()}/v1"
    for call in (lambda r: r.check(), lambda r: r.complete(["hello"])):
        t = time.perf_counter()
        with pytest.raises(ConnectionError, match=url.rsplit("/", 1)[0].replace(".", r"\.")):
            call(OpenAIReasoner(url, "world", timeout=0.3))
        assert time.perf_counter() - t < 3


def test_think_strip_and_keep():
    server, _, url = start_server(Thinker())
    try:
        strip = OpenAIReasoner(url, "thinker", think="strip").complete(["q", "split q"])
        keep = OpenAIReasoner(url, "thinker", think="keep").complete(["q", "split q"])
    finally:
        _stop(server)
    assert strip == ["SOLVED \\boxed{3}", "SOLVED \\boxed{3}"]
    assert keep == ["<think>count the bars</think>\nSOLVED \\boxed{3}", "<think>plan</think>SOLVED \\boxed{3}"]


def test_faults_are_retried_until_the_replies_match(prompts):
    """Each prompt three times (the server draws a fault per body and occurrence): every kind of fault occurs."""
    server, _, url = start_server(WorldBackend(), fail_rate=0.1, timeout_rate=0.1, malformed_rate=0.1, seed=1,
                                  fault_sleep=0.8)
    try:
        r = OpenAIReasoner(url, "world", concurrency=12, timeout=0.4, max_retries=12)
        assert r.complete(prompts * 3) == WorldReasoner().complete(prompts) * 3
        s = r.stats()
        assert s["retries"] > 0 and s["failures"] == 0 and s["requests"] == 3 * len(prompts) + s["retries"]
        assert server.faults.counts["fail"] and server.faults.counts["malformed"]
        assert server.faults.counts["timeout"]
    finally:
        _stop(server)


def test_without_retries_a_fault_is_an_exception_in_its_slot(prompts):
    server, _, url = start_server(WorldBackend(), fail_rate=0.5, seed=3)
    try:
        r = OpenAIReasoner(url, "world", timeout=30, max_retries=0)
        out = r.complete(prompts)
    finally:
        _stop(server)
    errs = [o for o in out if isinstance(o, Exception)]
    assert 0 < len(errs) < len(prompts) and r.stats()["failures"] == len(errs)
    assert all(isinstance(e, ServiceError) and e.status == 500 and url.removesuffix("/v1") in str(e) for e in errs)
    good = WorldReasoner().complete(prompts)
    assert [o for o in out if isinstance(o, str)] == [g for o, g in zip(out, good) if isinstance(o, str)]


def test_other_4xx_are_not_retried(world):
    r = OpenAIReasoner(world, "world", max_retries=5, extra_body={"n": 2})
    (err,) = r.complete(["question"])
    assert isinstance(err, ServiceError) and err.status == 400 and "HTTP 400" in str(err)
    assert r.stats()["retries"] == 0 and r.stats()["requests"] == 1


def test_temperature_zero_cache_in_memory_and_on_disk(tmp_path, prompts):
    server, _, url = start_server(WorldBackend())
    path = str(tmp_path / "cache.jsonl")
    try:
        r = OpenAIReasoner(url, "world", cache=path)
        first = r.complete(prompts)
        assert r.complete(prompts) == first
        assert r.stats()["requests"] == len(prompts) and r.stats()["cache_hits"] == len(prompts)
        hot = OpenAIReasoner(url, "world", temperature=0.7, cache="memory")
        hot.complete(prompts[:3])
        hot.complete(prompts[:3])
        assert hot.stats()["cache_hits"] == 0 and hot.stats()["requests"] == 6
    finally:
        _stop(server)
    again = OpenAIReasoner(url, "world", cache=path)               # the server is gone: all from disk
    assert again.complete(prompts) == first and again.stats()["requests"] == 0


def test_works_from_threads_from_a_running_loop_and_async(world, prompts):
    r = OpenAIReasoner(world, "world", concurrency=3)
    want = WorldReasoner().complete(prompts)
    results = []
    threads = [threading.Thread(target=lambda: results.append(r.complete(prompts))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [want] * 3

    async def inside_a_loop():
        out = r.complete(prompts), await r.acomplete(prompts)
        await r.aclose()
        return out

    sync_out, async_out = asyncio.run(inside_a_loop())
    assert sync_out == async_out == want


def test_clarifier_sends_the_image_and_matches_in_process_answers(tmp_path, problems):
    from acrl.backends.tiny import TinyCaptioner
    from acrl.config import TinyVLMConfig

    cap = TinyCaptioner.create(TinyVLMConfig(d_model=32, n_heads=2, n_layers=1, cnn_width=8, max_new_tokens=8))
    cap.save(str(tmp_path / "ref"))
    server, _, url = start_server(ClarifierBackend.load(str(tmp_path / "ref"), max_batch=1))
    try:
        clar = OpenAIClarifier(url, concurrency=4)
        images = [p.image for p in problems[:5]]
        questions = [f"what is the {w} ?" for w in ("red bar", "width", "height", "blue bar", "base")]
        got = clar.answer(images, questions)
        assert got == [cap.answer([im], [q])[0] for im, q in zip(images, questions)]
        assert clar.model == "ref" and clar.stats()["requests"] == 5
        bad = OpenAIReasoner(url, "ref", max_retries=3).complete(["no image here"])   # 400: not retried
        assert isinstance(bad[0], ServiceError) and bad[0].status == 400
    finally:
        _stop(server)


def test_server_errors_are_retried_until_a_reply_and_the_key_is_sent():
    with Scripted([(503, ERROR, {}, 0.0)] * 2) as srv:
        r = OpenAIReasoner(srv.url, "m", max_retries=2, api_key="sekrit")
        assert r.complete(["q"]) == ["SOLVED \\boxed{3}"]
    s = r.stats()
    assert (s["requests"], s["retries"], s["failures"]) == (3, 2, 0)
    assert all(h.get("authorization") == "Bearer sekrit" for h in srv.headers), srv.headers


def test_too_many_requests_waits_as_long_as_retry_after_says():
    with Scripted([(429, ERROR, {"Retry-After": "1"}, 0.0)]) as srv:
        r = OpenAIReasoner(srv.url, "m", max_retries=1)
        assert r.complete(["q"]) == ["SOLVED \\boxed{3}"]
    assert srv.arrivals[1] - srv.arrivals[0] >= 0.95          # the SDK's own first backoff is at most 0.5 s
    assert r.stats()["retries"] == 1


def test_a_bad_request_is_not_retried_and_fails_in_its_slot():
    with Scripted([(400, ERROR, {}, 0.0)]) as srv:
        r = OpenAIReasoner(srv.url, "m", max_retries=4)
        out = r.complete(["bad", "good"])
    err = next(o for o in out if isinstance(o, Exception))
    assert isinstance(err, ServiceError) and err.status == 400 and err.attempts == 1 and srv.url in str(err)
    assert "SOLVED \\boxed{3}" in out and len(srv.arrivals) == 2 and r.stats()["failures"] == 1


def test_a_request_past_its_timeout_is_retried_then_fails_in_its_slot():
    with Scripted([(200, _completion(), {}, 1.5)] * 2) as srv:
        r = OpenAIReasoner(srv.url, "m", timeout=0.3, max_retries=1)
        t = time.perf_counter()
        (err,) = r.complete(["q"])
        took = time.perf_counter() - t
    assert isinstance(err, ServiceError) and err.status is None and err.attempts == 2
    assert "timed out after 0.3s" in str(err) and len(srv.arrivals) == 2 and took < 1.5


def test_malformed_bodies_are_retried_and_fail_in_their_slot_without_retries():
    broken = b'{"choices": [{"message": {"content": "SOL'
    listed = json.dumps({"choices": [{"message": {"content": ["not", "text"]}}]}).encode()
    with Scripted([(200, broken, {}, 0.0), (200, listed, {}, 0.0)]) as srv:
        r = OpenAIReasoner(srv.url, "m", max_retries=2)
        assert r.complete(["q"]) == ["SOLVED \\boxed{3}"] and r.stats()["retries"] == 2
    with Scripted([(200, broken, {}, 0.0)]) as srv:
        (err,) = OpenAIReasoner(srv.url, "m", max_retries=0).complete(["q"])
    assert isinstance(err, ServiceError) and "malformed body" in str(err) and err.attempts == 1


def test_the_server_never_holds_more_than_concurrency_requests():
    with Scripted(hold=0.15) as srv:
        r = OpenAIReasoner(srv.url, "m", concurrency=3)
        assert r.complete([f"q{i}" for i in range(12)]) == ["SOLVED \\boxed{3}"] * 12
    assert srv.most == 3 and len(srv.arrivals) == 12
