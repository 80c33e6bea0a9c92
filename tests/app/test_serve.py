"""Serving the reasoner and the clarifier over HTTP (``acrl.app.serve``): the served world reasoner gives exactly the
in-process results for episodes, evaluation and training; faults and a server restart are survived with retries,
and without retries the affected episodes are ``failed`` (counted, never scored 0). All traffic is real HTTP on
127.0.0.1."""

import argparse
import json
import math
import os
import random
import subprocess
import sys
import threading
import time

import httpx
import pytest
from conftest import MICRO, ROOT

from acrl.app.serve import HFBackend, WorldBackend, add_serve_parser, build_backend, start_server
from acrl.backends.openai_api import OpenAIReasoner
from acrl.backends.tiny import TinyCaptioner
from acrl.config import TinyVLMConfig
from acrl.rollout.episode import EpisodeConfig, run_episodes
from acrl.rollout.metrics import episode_metrics
from acrl.rollout.prompts import decision_prompt
from acrl.world import human_caption_for, make_problems, oracle_caption_for
from acrl.world.reasoner import OracleClarifier, WorldReasoner

SMALL = TinyVLMConfig(d_model=32, n_heads=2, n_layers=1, cnn_width=8, max_new_tokens=12)
FIELDS = ("decision", "question", "clarification", "prediction", "correct", "tier", "malformed", "deny_prediction",
          "deny_correct", "replies")


def _stop(server):
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def world():
    problems = make_problems("test", 24)
    rng = random.Random(0)
    captions = [[oracle_caption_for(p), human_caption_for(p, rng, 0.3), human_caption_for(p, rng, 0.7)]
                for p in problems]
    return problems, captions, OracleClarifier(problems)


@pytest.fixture(scope="module")
def served():
    server, _, url = start_server(WorldBackend())
    yield url
    _stop(server)


def _view(groups):
    """Everything an episode decided, comparable across runs (reward NaN as a string)."""
    return [[{**{k: getattr(ep, k) for k in FIELDS}, "reward": repr(ep.reward)} for ep in g] for g in groups]


def test_endpoints_and_response_format(served):
    base = served.removesuffix("/v1")
    assert httpx.get(base + "/health").json()["status"] == "ok"
    assert [m["id"] for m in httpx.get(served + "/models").json()["data"]] == ["world"]
    assert httpx.get(base + "/nothing").status_code == 404
    assert httpx.post(served + "/chat/completions", content=b"{not json").status_code == 400
    assert httpx.post(served + "/chat/completions", json={"model": "world", "messages": []}).status_code == 400
    r = httpx.post(served + "/chat/completions", json={"model": "gpt-x", "messages": [{"role": "user",
                                                                                       "content": "hi"}]})
    assert r.status_code == 404 and "gpt-x" in r.json()["error"]["message"]
    p = make_problems("test", 1)[0]
    prompt = decision_prompt(p.question_with_choices(), oracle_caption_for(p))
    body = httpx.post(served + "/chat/completions", json={
        "model": "world", "messages": [{"role": "system", "content": "be brief"},
                                       {"role": "user", "content": [{"type": "text", "text": prompt}]}]}).json()
    assert body["choices"][0]["message"]["content"] == WorldReasoner().reply(prompt)
    assert body["id"].startswith("chatcmpl-") and body["model"] == "world" and body["object"] == "chat.completion"
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"] > 0


@pytest.mark.parametrize("mode,record_deny", [("on", True), ("off", False), ("deny", False)])
def test_episodes_in_process_and_served_are_identical(world, served, mode, record_deny):
    problems, captions, clarifier = world
    cfg = EpisodeConfig(clarification=mode, record_deny=record_deny)
    local = run_episodes(problems, captions, WorldReasoner(), clarifier, cfg)
    remote = run_episodes(problems, captions, OpenAIReasoner(served, "world", concurrency=8), clarifier, cfg)
    assert _view(remote) == _view(local)
    assert episode_metrics(remote) == pytest.approx(episode_metrics(local), nan_ok=True)
    m = episode_metrics(local)
    assert m["failed"] == 0 and 0 < m["accuracy"] < 1
    if mode == "on":
        assert 0 < m["clarification_rate"] < 1


def test_evaluate_and_training_in_process_and_served_are_identical(world, served, tmp_path):
    from acrl.app.assemble import world_source
    from acrl.config import load_config
    from acrl.eval.evaluate import evaluate
    from acrl.train.loop import Run, train

    problems = world[0][:8]
    policy = TinyCaptioner.create(SMALL, seed=0)
    a = evaluate(policy, WorldReasoner(), policy, problems, batch_size=8)
    b = evaluate(policy, OpenAIReasoner(served, "world"), policy, problems, batch_size=8)
    assert json.dumps(a) == json.dumps(b)

    cfg = load_config(MICRO, ["train.steps=2", "train.checkpoint_every=100"])

    def run(reasoner, out):
        pol = TinyCaptioner.create(SMALL, seed=0)
        hist = train(Run(cfg, str(tmp_path / out), pol, reasoner, pol, world_source(cfg)), progress=False)
        return [{k: v for k, v in h.items() if not k.startswith("time_")} for h in hist]

    local, remote = run(WorldReasoner(), "local"), run(OpenAIReasoner(served, "world"), "remote")
    assert remote == local and all("loss" in h for h in local)

    # every request fails: the step is retried, never counted, and the run stops with a checkpoint
    from acrl.train.checkpoint import latest
    from acrl.train.guard import ServiceDown

    cfg.train.step_retries, cfg.train.retry_wait = 2, 0.01
    down, _, url = start_server(WorldBackend(), fail_rate=1.0)
    try:
        with pytest.raises(ServiceDown, match="of the step's episodes failed") as e:
            run(OpenAIReasoner(url, "world", max_retries=0), "down")
    finally:
        _stop(down)
    assert e.value.step == 0 and latest(str(tmp_path / "down")).step == 0
    assert not open(tmp_path / "down" / "metrics.jsonl").read()


def _restart_mid_run(server, port, after_requests, pause, state):
    """Kill ``server`` like a crash once it has seen ``after_requests`` requests; restart on ``port``."""
    deadline = time.perf_counter() + 30
    while server.counts["requests"] < after_requests and time.perf_counter() < deadline:
        time.sleep(0.005)
    server.kill()
    state["killed_at"] = time.perf_counter()
    time.sleep(pause)
    state["server"] = start_server(WorldBackend(), port=port, fail_rate=0.2, timeout_rate=0.05,
                                   malformed_rate=0.05, seed=2, fault_sleep=1.0)[0]


def test_faults_and_a_restart_are_survived_with_retries(world):
    problems, captions, clarifier = world
    cfg = EpisodeConfig(clarification="on", record_deny=True)
    clean = run_episodes(problems, captions, WorldReasoner(), clarifier, cfg)
    server, _, url = start_server(WorldBackend(), fail_rate=0.2, timeout_rate=0.05, malformed_rate=0.05, seed=1,
                                  fault_sleep=1.5)
    state: dict = {}
    watcher = threading.Thread(target=_restart_mid_run, args=(server, server.server_address[1], 40, 0.3, state))
    watcher.start()
    reasoner = OpenAIReasoner(url, "world", concurrency=8, timeout=1.0, max_retries=10)
    try:
        groups = run_episodes(problems, captions, reasoner, clarifier, cfg)
        done = time.perf_counter()
    finally:
        watcher.join()
        if "server" in state:
            _stop(state["server"])
    assert state["killed_at"] < done and state["server"].counts["completions"] > 0
    assert sum(server.faults.counts.values()) > 0 and server.faults.counts["fail"] > 0
    s = reasoner.stats()
    assert s["retries"] > 0 and s["failures"] == 0
    assert _view(groups) == _view(clean)


def test_without_retries_failed_episodes_are_marked_counted_and_excluded(world):
    problems, captions, clarifier = world
    cfg = EpisodeConfig(clarification="on")
    clean = run_episodes(problems, captions, WorldReasoner(), clarifier, cfg)
    server, _, url = start_server(WorldBackend(), fail_rate=0.2, timeout_rate=0.05, malformed_rate=0.05, seed=4,
                                  fault_sleep=1.0)
    try:
        groups = run_episodes(problems, captions, OpenAIReasoner(url, "world", concurrency=16, timeout=0.3,
                                                                 max_retries=0), clarifier, cfg)
    finally:
        _stop(server)
    flat, ref = [e for g in groups for e in g], [e for g in clean for e in g]
    failed = [e for e in flat if e.tier == "failed"]
    assert 0 < len(failed) < len(flat)
    assert all(math.isnan(e.reward) and not e.correct and "chat/completions" in e.error for e in failed)
    assert episode_metrics(groups)["failed"] == len(failed)
    for e, r in zip(flat, ref):
        if e.tier != "failed":
            assert {k: getattr(e, k) for k in FIELDS} == {k: getattr(r, k) for k in FIELDS}
            assert e.reward == r.reward
    live = [e for e in flat if e.tier != "failed"]
    assert episode_metrics(groups)["reward"] == pytest.approx(sum(e.reward for e in live) / len(live))


def test_serve_command_line(tmp_path):
    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", "reasoner", "--backend", "world", "--read-budget", "3", "--port", "0",
                              "--fail-rate", "0.2"])
    assert args.fn.__name__ == "cmd_serve" and args.fail_rate == 0.2
    assert build_backend(args).reasoner.read_budget == 3
    args = parser.parse_args(["serve", "clarifier", "--captioner", str(tmp_path / "ref"), "--port", "9"])
    assert args.serve_command == "clarifier" and args.port == 9

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "acrl.app.serve", "reasoner", "--backend", "world", "--port", "0",
                             "--fail-rate", "0.3", "--fault-seed", "5"], stdout=subprocess.PIPE, text=True,
                            env=env, cwd=ROOT)
    try:
        line = proc.stdout.readline()
        assert "serving reasoner model 'world' at http://127.0.0.1:" in line, line
        url = line.split(" at ")[-1].strip()
        p = make_problems("test", 3)
        prompts = [decision_prompt(x.question_with_choices(), oracle_caption_for(x)) for x in p]
        r = OpenAIReasoner(url, "world")
        assert r.complete(prompts) == WorldReasoner().complete(prompts)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        proc.stdout.close()


def _tiny_llama(path):
    """A random 1-layer Llama and a byte-level BPE tokenizer trained here on world prompts (no downloads)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    corpus = [decision_prompt(p.question_with_choices(), oracle_caption_for(p)) for p in make_problems("train", 30)]
    corpus += ["SOLVED \\boxed{7}", "NEED MORE INFO\nWhat is the height of the red bar?"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    fast.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                          "{% if add_generation_prompt %}assistant:{% endif %}")
    fast.save_pretrained(path)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    LlamaForCausalLM(cfg).save_pretrained(path)


def test_hf_reasoner_in_process_and_served(world, tmp_path):
    from acrl.backends.hf.reasoner import HFReasoner

    _tiny_llama(tmp_path / "llm")
    hf = HFReasoner(str(tmp_path / "llm"), max_new_tokens=6, batch_size=4)
    problems, captions, clarifier = world
    groups = run_episodes(problems[:4], [c[:2] for c in captions[:4]], hf, clarifier, EpisodeConfig())
    flat = [e for g in groups for e in g]
    assert all(len(e.replies) >= 1 and isinstance(e.replies[0], str) for e in flat)
    m = episode_metrics(groups)
    assert m["episodes"] == 8 and m["failed"] == 0
    assert m["malformed"] == sum(e.malformed is not None for e in flat) > 0     # a random model rambles
    assert len(hf.chat([[{"role": "user", "content": "hi"}]] * 3, temperature=0.8)) == 3

    server, _, url = start_server(HFBackend(hf, "tiny-llama"))
    try:
        prompts = [f"question {i}" for i in range(5)]
        out = OpenAIReasoner(url, "tiny-llama", concurrency=5, max_tokens=4).complete(prompts)
        assert len(out) == 5 and all(isinstance(o, str) for o in out)
        assert server.counts["completions"] == 5
    finally:
        _stop(server)


# --- adversarial requests and flags: every malformed request gets a 4xx, every bad flag one line ---------------

def _raw_post(url: str, head: bytes, body: bytes = b"") -> tuple[int, bytes]:
    """Send raw bytes (headers as given, not what a client library would fix up); the status and the body."""
    import socket as _socket

    host, port = url.split("//")[1].split("/")[0].split(":")
    with _socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(head + body)
        data = b""
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < int(
                [h for h in data.split(b"\r\n") if h.lower().startswith(b"content-length")][0].split(b":")[1]):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    return int(data.split(b" ", 2)[1]), data.split(b"\r\n\r\n", 1)[1]


def _post(path="/v1/chat/completions", length=None, body=b""):
    head = (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body) if length is None else length}\r\n\r\n").encode()
    return head, body


def _chat(content) -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": content}]}).encode()


BAD_REQUESTS = {
    "huge Content-Length": (_post(length=10 ** 15), 413),
    "negative Content-Length": (_post(length=-5), 400),
    "non-numeric Content-Length": (_post(length="lots"), 400),
    "deeply nested JSON": (_post(body=b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"), 400),
    "non-string text part": (_post(body=_chat([{"type": "text", "text": 5}])), 400),
    "text part is an object": (_post(body=_chat([{"type": "text", "text": {"a": 1}}])), 400),
    "content is a number": (_post(body=_chat(7)), 400),
    "messages not a list": (_post(body=b'{"messages": "hi"}'), 400),
    "message not an object": (_post(body=b'{"messages": [5]}'), 400),
    "body not an object": (_post(body=b"[1, 2]"), 400),
    "not JSON": (_post(body=b"{nope"), 400),
    "not UTF-8": (_post(body=b"\xff\xfe\x00"), 400),
    "n=2": (_post(body=json.dumps({"messages": [{"role": "user", "content": "q"}], "n": 2}).encode()), 400),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_malformed_requests_get_a_4xx_and_the_server_keeps_serving(name):
    server, _, url = start_server(WorldBackend())
    try:
        (head, body), status = BAD_REQUESTS[name]
        got, payload = _raw_post(url, head, body)
        assert got == status, (name, got, payload[:200])
        assert json.loads(payload)["error"]["code"] == status
        ok = httpx.post(f"{url}/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]},
                        timeout=10)
        assert ok.status_code == 200                                  # still serving
    finally:
        _stop(server)


def test_the_body_limit_is_a_flag(tmp_path):
    from acrl.app.serve import make_server

    server = make_server(WorldBackend(), max_body=100)
    t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        assert _raw_post(url, *_post(body=_chat("x" * 200)))[0] == 413
        assert _raw_post(url, *_post(body=_chat("x")))[0] == 200
    finally:
        _stop(server)


def _serve_cli(capsys, *args):
    """``acrl serve ARGS`` in this process (it must fail before serving); (exit code, stderr)."""
    from acrl.app.cli import main

    rc = main(["serve", *map(str, args)])
    return rc, capsys.readouterr().err


BAD_FLAGS = [
    (["reasoner", "--port", "70000"], "--port 70000"),
    (["reasoner", "--port", "-1"], "--port -1"),
    (["reasoner", "--batch-wait", "-1"], "--batch-wait"),
    (["reasoner", "--fail-rate", "0.8", "--timeout-rate", "0.5"], "--fail-rate"),
    (["reasoner", "--max-body-mb", "0"], "--max-body-mb"),
    (["reasoner", "--read-budget", "0"], "--read-budget"),
    (["reasoner", "--backend", "hf", "--model", "/no/such/model"], "--model /no/such/model: no such directory"),
    (["reasoner", "--backend", "hf", "--model", "./missing"], "--model ./missing: no such directory"),
    (["reasoner", "--backend", "hf", "--model", "nobody/no-such-model-here"], "--model nobody/no-such-model-here"),
    (["clarifier", "--captioner", "/no/such/dir"], "--captioner /no/such/dir"),
    (["reasoner", "--host", "no-such-host.invalid"], "--host"),
]


@pytest.mark.parametrize("args, named", BAD_FLAGS, ids=[" ".join(a[1:3]) for a, _ in BAD_FLAGS])
def test_bad_flags_are_one_line_errors_naming_the_flag(args, named, capsys):
    rc, err = _serve_cli(capsys, *args)
    assert rc != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert named in lines[0]


def test_a_port_in_use_and_a_broken_checkpoint_are_named(tmp_path, capsys):
    server, _, url = start_server(WorldBackend())
    try:
        rc, err = _serve_cli(capsys, "reasoner", "--port", server.server_address[1])
        assert rc != 0 and len(err.strip().splitlines()) == 1
        assert f"--port {server.server_address[1]}" in err and "already in use" in err
    finally:
        _stop(server)
    bad = tmp_path / "cap"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    rc, err = _serve_cli(capsys, "clarifier", "--captioner", bad)
    assert rc != 0 and len(err.strip().splitlines()) == 1, err
    assert f"--captioner {bad}" in err
