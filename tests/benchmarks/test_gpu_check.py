"""The CPU side of benchmarks/gpu_check.py: real-dimension configs on the meta device, the no-GPU exit, and the
dry mode (every phase of the check at tiny dimensions on CPU)."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(ROOT, "benchmarks", "gpu_check.py"))
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)
CLEAN_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}   # the script must find src itself


def test_real_dimension_models_build_on_the_meta_device():
    qwen = gpu_check.meta_parameters("qwen2.5-vl-3b")
    intern = gpu_check.meta_parameters("internvl-2b")
    assert 3.6e9 < qwen < 3.9e9, qwen            # Qwen2.5-VL-3B-Instruct: 3.75B
    assert 2.0e9 < intern < 2.2e9, intern        # InternVL3-2B: 2.09B
    cfg = gpu_check.real_config("qwen2.5-vl-3b")
    assert cfg.text_config.vocab_size == 151936 and cfg.text_config.hidden_size == 2048
    with pytest.raises(ValueError, match="unknown family"):
        gpu_check.real_config("llama")


def test_real_processors_give_about_1k_visual_tokens():
    """The paper's ~1k visual tokens per image: Qwen2.5-VL 1,024 at 896 px, InternVL 5 x 256 tiles."""
    from PIL import Image

    im = Image.new("RGB", (1000, 800), "white")
    for name in gpu_check.PAPER:
        proc = gpu_check.real_processor(name)
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "q"}]}]
        text = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        ids = proc(text=[text], images=[im], return_tensors="pt")["input_ids"][0]
        image_id = proc.tokenizer.convert_tokens_to_ids("<|image_pad|>" if "qwen" in name else "<IMG_CONTEXT>")
        assert 900 <= int((ids == image_id).sum()) <= 1300, (name, int((ids == image_id).sum()))


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: the check would run")
def test_without_cuda_it_fails_with_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "gpu_check.json"
    p = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh"), "--out", str(out)],
                       capture_output=True, text=True, env={**CLEAN_ENV, "PYTHON": sys.executable}, cwd=tmp_path)
    assert p.returncode != 0 and not out.exists()
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "no CUDA device" in lines[0] and "Traceback" not in p.stderr
    bad = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py"), "--families", "x"],
                         capture_output=True, text=True, env=CLEAN_ENV)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


def test_dry_mode_runs_every_phase_on_cpu_and_writes_the_results(tmp_path):
    """The script itself (src found from its own location, not from PYTHONPATH), one family at tiny dimensions:
    every phase timed, the on-policy ratio 1, the sampler/trainer mismatch measured, a randomised adapter that
    changes the captions, and the results file holding it all."""
    out = tmp_path / "dry.json"
    p = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py"), "--dry-run",
                        "--families", "qwen2.5-vl-3b", "--out", str(out)],
                       capture_output=True, text=True, env=CLEAN_ENV, cwd=tmp_path, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads(out.read_text())
    fam = res["families"]["qwen2.5-vl-3b"]
    assert fam["verdict"] == "pass"
    assert set(fam["phases"]) == {"load", "self_test", "generation", "reference", "update"}
    assert all(ph["seconds"] >= 0 for ph in fam["phases"].values())
    assert fam["self_test"]["ok"] and fam["self_test"]["lora_targets"] > 0
    assert abs(fam["update"]["ratio_mean"] - 1) < 1e-6 and fam["ratio_first_micro_batch_max_abs_dev"] < 1e-5
    assert fam["mismatch"]["tokens"] > 0 and fam["mismatch"]["max_abs"] < 1e-4     # fp32 on CPU
    assert fam["adapter"]["captions_changed"] > 0 and fam["adapter"]["adapter_off_equals_start"]
    assert fam["caption_tokens"] > 0 and fam["visual_tokens"] > 0


def test_a_failed_phase_is_recorded_and_the_exit_is_non_zero(tmp_path, monkeypatch):
    """A family whose step raises leaves its phases so far and the error in the file, and the exit is not 0."""
    out = tmp_path / "dry.json"

    def broken(*a, **k):
        raise RuntimeError("out of memory in the update")

    import acrl.core.update

    monkeypatch.setattr(acrl.core.update, "update", broken)
    rc = gpu_check.main(["--dry-run", "--families", "internvl-2b", "--out", str(out)])
    fam = json.loads(out.read_text())["families"]["internvl-2b"]
    assert rc == 2 and "out of memory" in fam["error"] and "generation" in fam["phases"]
