import json
import os
import socket
import subprocess
import sys

import pytest
import torch

torch.set_num_threads(1)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MICRO = os.path.join(ROOT, "configs", "micro.yaml")


def run_cli(*args, check=True):
    """Run the real `acrl` CLI in a subprocess (as a user would) and return the completed process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "acrl", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"acrl {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stdout}\n"
                             f"{proc.stderr}")
    return proc


def lines(path) -> list[dict]:
    """The records of a JSONL file (blank lines skipped)."""
    return [json.loads(x) for x in open(path) if x.strip()]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def micro_captioner(tmp_path_factory):
    """A micro warm-started captioner written by the real `acrl warmstart` command."""
    out = tmp_path_factory.mktemp("ws") / "captioner"
    run_cli("warmstart", "--config", MICRO, "--out", out)
    return out


@pytest.fixture(scope="session")
def tiny_llm(tmp_path_factory):
    """A tiny random Llama causal LM (with a chat template) built from a config: no downloads."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from acrl.backends.hf.tiny import build_tokenizer

    path = tmp_path_factory.mktemp("llm") / "tiny-llama"
    tok = build_tokenizer("qwen2-vl")
    tok.save_pretrained(path)
    torch.manual_seed(0)
    ids = tok.convert_tokens_to_ids
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                      bos_token_id=None, eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<pad>"))
    LlamaForCausalLM(cfg).save_pretrained(path)
    return str(path)
