"""What a saved captioner directory holds, and the weights it stands for.

``HFCaptioner.save`` writes a standard PEFT adapter directory plus ``acrl_captioner.json`` (:data:`META_FILE`)
naming the base model. Training that starts from an adapter (an SFT or an earlier run) merges it into the base
weights and trains a new adapter on top, so π_ref (adapter disabled) is the starting checkpoint; the merged
adapters are copied into every saved checkpoint (``reference/<i>``) so that a resumed run rebuilds the same
π_ref (:func:`reference_adapters`, :func:`load_merged_model`). :func:`lineage` tells whether two checkpoints are
the same weights without loading them; :func:`export_merged` writes a merged, stand-alone checkpoint.
:func:`write_checkpoint` writes the format, the other functions read it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

from acrl.backends.hf.loading import load_model, load_processor, quiet, read_json, torch_dtype
from acrl.config import HFSettings

META_FILE = "acrl_captioner.json"
REFERENCE_DIR = "reference"          # inside a saved checkpoint: the adapters merged into π_ref, in order
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")


def resolve_checkpoint(path: str) -> tuple[str, str | None]:
    """(base model, adapter directory or None) of a captioner checkpoint: an ``HFCaptioner.save`` directory
    (``acrl_captioner.json``), a plain PEFT adapter directory, or a base model (directory or hub name)."""
    if os.path.isdir(path) and os.path.exists(os.path.join(path, META_FILE)):
        with open(os.path.join(path, META_FILE)) as fh:
            meta = json.load(fh)
        base = meta.get("base") or "."
        if base == ".":
            base = path
        elif not os.path.isabs(base) and os.path.isdir(os.path.join(path, base)):
            base = os.path.join(path, base)
        return base, (path if meta.get("lora") else None)
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "adapter_config.json")):
        with open(os.path.join(path, "adapter_config.json")) as fh:
            base = json.load(fh).get("base_model_name_or_path") or ""
        if not base:
            raise ValueError(f"adapter {path!r} names no base model (base_model_name_or_path)")
        return base, path
    return path, None


def _meta(path: str) -> dict:
    if os.path.isdir(path) and os.path.exists(os.path.join(path, META_FILE)):
        with open(os.path.join(path, META_FILE)) as fh:
            return json.load(fh)
    return {}


def reference_adapters(path: str) -> tuple[list[str], list[str]]:
    """(directories, origins) of the adapters a checkpoint's π_ref merges into the base, in order: those a run
    that started from an adapter copied into ``reference/`` (empty for a run that started from a base model)."""
    meta = _meta(path)
    dirs = [os.path.join(path, d) for d in meta.get("reference_adapters", [])]
    for d in dirs:
        if not os.path.exists(os.path.join(d, "adapter_config.json")):
            raise FileNotFoundError(f"checkpoint {path!r} lists the reference adapter {d!r}, which is missing")
    return dirs, list(meta.get("reference_sources", dirs))


def identity(path: str) -> str:
    """A path's real location when it exists (hub names as they are): how lineages name their parts."""
    return os.path.realpath(path) if os.path.exists(path) else path


def lineage(path: str) -> tuple[str, tuple[str, ...]]:
    """What a checkpoint's weights are: (base model, adapters applied in order), by origin, to tell whether two
    checkpoints are the same model without loading them."""
    base, adapter = resolve_checkpoint(path)
    _, sources = reference_adapters(path)
    return identity(base), tuple(sources) + ((identity(adapter),) if adapter else ())


def merge_adapters(model, adapters: list[str]):
    """``model`` with each PEFT adapter directory of ``adapters`` merged into its weights, in order."""
    from peft import PeftModel

    for a in adapters:
        with quiet():
            model = PeftModel.from_pretrained(model, a).merge_and_unload()
    return model


def load_merged_model(path: str, settings: HFSettings):
    """The plain model of a checkpoint, with its reference adapters and its adapter (if any) merged in (frozen
    references, exports)."""
    base, adapter = resolve_checkpoint(path)
    refs, _ = reference_adapters(path)
    return merge_adapters(load_model(base, settings), refs + ([adapter] if adapter else []))


def write_checkpoint(path: str, model, processor, lora: bool, base_path: str, reference_adapters: list[str],
                     reference_sources: list[str], model_type: str) -> None:
    """A captioner checkpoint in ``path`` (``HFCaptioner.save``). ``lora``: ``model`` is a ``PeftModel``, saved as
    a standard PEFT directory whose :data:`META_FILE` names ``base_path``, with the ``reference_adapters`` (merged
    into the base, in order) copied to ``reference/<i>``. Else the whole model and ``processor``
    (``save_pretrained``), the base being the directory itself."""
    os.makedirs(path, exist_ok=True)
    meta: dict[str, Any] = {}
    if lora:
        model.save_pretrained(path)
        base = base_path
        if base and os.path.isdir(base):
            base = os.path.abspath(base)
        rels = []
        for i, src in enumerate(reference_adapters):
            rel = os.path.join(REFERENCE_DIR, str(i))
            dst = os.path.join(path, rel)
            if not (os.path.isdir(dst) and os.path.samefile(src, dst)):
                os.makedirs(dst, exist_ok=True)
                for f in ADAPTER_FILES:
                    if os.path.exists(os.path.join(src, f)):
                        shutil.copyfile(os.path.join(src, f), os.path.join(dst, f))
            rels.append(rel)
        if rels:
            meta = {"reference_adapters": rels, "reference_sources": reference_sources}
    else:
        model.save_pretrained(path)
        processor.save_pretrained(path)
        base = "."
    with open(os.path.join(path, META_FILE), "w") as fh:
        json.dump({"format": 1, "backend": "hf", "base": base, "lora": lora, "model_type": model_type, **meta},
                  fh, indent=1)


def write_without_adapter(model, processor, out: str) -> str:
    """``model`` (the base model under a LoRA adapter) without its adapter layers, as one plain checkpoint with
    ``processor`` in ``out``: the weights the adapter is disabled to."""
    state = {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items() if "lora_" not in k}
    os.makedirs(out, exist_ok=True)
    with quiet():
        model.save_pretrained(out, state_dict=state)
    processor.save_pretrained(out)
    return out


def export_merged(policy_or_path: Any, out: str, dtype: str | None = None) -> str:
    """Merge a LoRA captioner into its base weights and write a stand-alone checkpoint (model + processor) to
    ``out``, loadable with ``AutoModelForImageTextToText.from_pretrained(out)`` (and by vLLM).

    ``policy_or_path``: a live ``HFCaptioner`` or a directory written by ``HFCaptioner.save`` (e.g.
    ``RUN/checkpoint/policy``). The merge runs on CPU in fp32; the result is stored in ``dtype`` (``bf16``,
    ``fp16``, ``fp32``; default: the dtype the base checkpoint declares).
    """
    if not isinstance(policy_or_path, (str, os.PathLike)):     # a live captioner: saved first
        with tempfile.TemporaryDirectory() as tmp:
            policy_or_path.save(tmp)
            return export_merged(tmp, out, dtype)
    base, _ = resolve_checkpoint(policy_or_path)
    model = load_merged_model(policy_or_path, HFSettings(device="cpu", dtype="fp32"))
    if dtype is None:
        cfg = read_json(base, "config.json") or {}
        declared = str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32")
        dtype = {"bfloat16": "bf16", "float16": "fp16"}.get(declared, "fp32")
    model = model.to(torch_dtype(dtype, "cpu"))
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out)
    load_processor(base).save_pretrained(out)
    return out
