"""Make PyPI's torchvision importable beside a CPU-only torch (the vLLM CPU engine's environment).

PyPI ships torchvision built against CUDA torch: its C++ ops (``_C.so``) cannot load beside ``torch+cpu``, and
``torchvision/_meta_registrations.py`` then fails at import on two unconditional ``register_fake`` calls for ops
that were never defined (``operator torchvision::nms does not exist``). This script guards those two calls the way
the file already guards its other registrations (only when the C++ ops loaded). torchvision then imports without
its C++ ops (``torchvision.extension._has_ops()`` is False): the image transforms vLLM's and transformers' Qwen-VL
processors use work; detection ops (nms, roi_align) do not. Idempotent; exits non-zero when the file is not the
one it knows or torchvision still does not import.

Usage: python tools/cpu_torchvision.py   (with the environment's python)
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

OPS = ("nms", "qnms")
GUARD = "(lambda fn: fn) if not torchvision.extension._has_ops() else "


def main() -> int:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        print("cpu_torchvision: torchvision is not installed in this environment", file=sys.stderr)
        return 1
    path = os.path.join(spec.submodule_search_locations[0], "_meta_registrations.py")
    with open(path) as fh:
        text = fh.read()
    changed = 0
    for op in OPS:
        plain = f'@torch.library.register_fake("torchvision::{op}")\n'
        guarded = f'@({GUARD}torch.library.register_fake("torchvision::{op}"))\n'
        if guarded in text:
            continue
        if text.count(plain) != 1:
            print(f"cpu_torchvision: {path} has no single register_fake for torchvision::{op}; "
                  f"unknown torchvision version, not patched", file=sys.stderr)
            return 1
        text, changed = text.replace(plain, guarded), changed + 1
    if changed:
        with open(path, "w") as fh:
            fh.write(text)
    check = subprocess.run([sys.executable, "-c", "import torchvision.transforms.v2"], capture_output=True, text=True)
    if check.returncode:
        last = (check.stderr.strip().splitlines() or ["?"])[-1]
        print(f"cpu_torchvision: torchvision still does not import: {last}", file=sys.stderr)
        return 1
    print(f"cpu_torchvision: {'patched' if changed else 'already patched'} {path}; torchvision imports")
    return 0


if __name__ == "__main__":
    sys.exit(main())
