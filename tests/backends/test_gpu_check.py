"""The CPU side of benchmarks/gpu_check.py: real-dimension configs on the meta device, and the no-GPU exit."""

import importlib.util
import os
import subprocess
import sys

import pytest

pytest.importorskip("transformers")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(ROOT, "benchmarks", "gpu_check.py"))
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)


def test_real_dimension_models_build_on_the_meta_device():
    qwen = gpu_check.meta_parameters("qwen2.5-vl-3b")
    intern = gpu_check.meta_parameters("internvl-2b")
    assert 3.6e9 < qwen < 3.9e9, qwen            # Qwen2.5-VL-3B-Instruct: 3.75B
    assert 2.0e9 < intern < 2.2e9, intern        # InternVL3-2B: 2.09B
    cfg = gpu_check.real_config("qwen2.5-vl-3b")
    assert cfg.text_config.vocab_size == 151936 and cfg.text_config.hidden_size == 2048
    with pytest.raises(ValueError, match="unknown family"):
        gpu_check.real_config("llama")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a CUDA device is present: the check would run")
def test_without_cuda_it_says_so_exits_0_and_writes_nothing(tmp_path):
    out = tmp_path / "gpu_check.json"
    p = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh"), "--out", str(out)],
                       capture_output=True, text=True, env={**os.environ, "PYTHON": sys.executable})
    assert p.returncode == 0 and "no CUDA device" in p.stdout and not out.exists()
    bad = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py"), "--families", "x"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr
