"""Shared settings, images and steps of the HF backend's tests."""

import os

import numpy as np
import torch
from PIL import Image

from acrl.config import LoraSettings

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
PAPER = {"internvl": "internvl-2b.yaml"}   # every other family: the Qwen2.5-VL-3B config
LORA = LoraSettings(enabled=True, r=4, alpha=8)
QUESTIONS = ["What is the height of the red bar?", "How many circles are there?"]


def square_images(k=2, size=64, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(k)]


def tall_images(k=2, seed=0):
    """Images of different heights (64, 80, ...) and width 64."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (64 + 16 * i, 64, 3), dtype=np.uint8)) for i in range(k)]


def shaped_images(shapes=((64, 64), (40, 90)), seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in shapes]


def sgd_step(cap, roll, lr=1.0):
    opt = torch.optim.SGD(cap.trainable_parameters(), lr=lr)
    opt.zero_grad()
    (-(cap.logprobs(roll) * roll.mask).sum()).backward()
    opt.step()


def randomize_adapter(cap, seed=0, std=0.05):
    """Give the adapter non-zero B matrices, as after some training (a fresh adapter's B = 0 hides dropout)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in cap.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def paper_config(family):
    from acrl.config import load_config

    return load_config(os.path.join(ROOT, "configs", PAPER.get(family, "qwen2.5-vl-3b.yaml")),
                       ["captioner.device=cpu", "captioner.dtype=fp32", "captioner.max_new_tokens=6"])
