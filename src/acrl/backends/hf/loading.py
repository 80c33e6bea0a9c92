"""Loading a Hugging Face vision-language model: device, dtype, processor, model, LoRA adapter, checkpointing.

Devices: ``cuda`` means this process's GPU (``cuda:LOCAL_RANK`` under a launcher, :func:`resolve_device`), and
every public method of a model-holding object runs under that device (:func:`on_device`): CUDA's current device
is per thread, and the trainer calls the clarifier and the reasoner from a worker thread.

Without torchvision, processors that require a video processor (Qwen-VL, InternVL) can't be built by
``AutoProcessor``; :func:`load_processor` then falls back to :func:`no_video_processor_class`.

LoRA: PEFT adapters on every linear layer of the language model by default (:func:`lora_target_modules`; the
vision tower, the projector and the output head stay frozen). Gradient checkpointing hooks only the language
model's token embedding (:func:`enable_checkpointing`): the frozen vision tower is never back-propagated through.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import os
import re
import warnings
from dataclasses import dataclass, fields
from typing import Any

import torch

from acrl.config import HFSettings, LoraSettings

ALL_LINEAR = "all-linear"           # LoRA targets: every linear layer of the language model (not the head)
DEFAULT_TARGETS = ALL_LINEAR


# --- device and dtype ---------------------------------------------------------------------------------------
def resolve_device(name: str | None) -> str:
    """``auto``: ``cuda`` when available, else ``cpu``. A bare ``cuda`` is this process's GPU, named explicitly:
    ``cuda:LOCAL_RANK`` under a launcher (accelerate, torchrun), else the current device; so tensors moved there
    from any thread land on the model's GPU (the current device is per thread, and only the main thread's is
    set by the launcher). ``cuda:N``, ``cpu``, ... are kept."""
    name = name or "auto"
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        rank = os.environ.get("LOCAL_RANK")
        if rank is not None and rank.strip().isdigit():
            return f"cuda:{int(rank)}"
        if torch.cuda.is_available():
            return f"cuda:{torch.cuda.current_device()}"
    return name


def device_scope(device: str | torch.device):
    """Context in which CUDA's current device is ``device`` (nothing for other devices): a worker thread's
    allocations that name no index then land on the model's GPU, not on cuda:0."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is not None:
        return torch.cuda.device(dev.index)
    return contextlib.nullcontext()


def on_device(method):
    """Run a public method of an object with a ``device`` attribute under :func:`device_scope`."""
    @functools.wraps(method)
    def run(self, *args, **kwargs):
        with device_scope(self.device):
            return method(self, *args, **kwargs)
    return run


def torch_dtype(name: str, device: str) -> torch.dtype:
    name = name.lower()
    if name == "auto":
        if device.startswith("cuda") and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
             "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}
    if name not in table:
        raise ValueError(f"captioner.dtype must be one of auto, bf16, fp16, fp32; got {name!r}")
    return table[name]


# --- processor and model ------------------------------------------------------------------------------------
def no_video_processor_class(cls):
    """``cls`` without its video processor (which needs torchvision), under the same class name so that saved
    files stay standard.

    ``__init__`` keeps the original parameters minus ``video_processor`` as real arguments:
    ``save_pretrained`` and ``from_pretrained`` read them from the signature and the code object (e.g.
    ``image_seq_length``).
    """
    sig = inspect.signature(cls.__init__)
    if "video_processor" not in sig.parameters:
        return cls
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    names = [n for n, p in sig.parameters.items() if p.kind in kinds and n not in ("self", "video_processor")]
    empty = inspect.Parameter.empty
    defaults = {n: (None if sig.parameters[n].default is empty else sig.parameters[n].default) for n in names}
    src = (f"def __init__(self, {''.join(f'{n}=_d[{n!r}], ' for n in names)}**kwargs):\n"
           f"    kwargs.pop('video_processor', None)\n"
           f"    _cls.__init__(self, video_processor=None, {''.join(f'{n}={n}, ' for n in names)}**kwargs)\n")
    scope: dict = {"_d": defaults, "_cls": cls}
    exec(compile(src, f"<no-video {cls.__name__}>", "exec"), scope)  # noqa: S102 - our own generated source
    return type(cls.__name__, (cls,), {"__init__": scope["__init__"], "__module__": cls.__module__})


def read_json(path: str, name: str) -> dict | None:
    """``name`` from a local directory or the hub cache (None when absent or unreachable)."""
    try:
        if os.path.isdir(path):
            f = os.path.join(path, name)
        else:
            from transformers.utils import cached_file

            f = cached_file(path, name, _raise_exceptions_for_missing_entries=False,
                            _raise_exceptions_for_connection_errors=False)
        if f and os.path.exists(f):
            with open(f) as fh:
                return json.load(fh)
    except Exception:  # noqa: BLE001 - a missing or unreadable file only disables a fallback
        return None
    return None


def _processor_class_name(path: str) -> str | None:
    for name in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        data = read_json(path, name) or {}
        if data.get("processor_class"):
            return data["processor_class"]
    model_type = (read_json(path, "config.json") or {}).get("model_type")
    if model_type:
        from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

        return PROCESSOR_MAPPING_NAMES.get(model_type)
    return None


def _hub_error(path: str, err: Exception) -> RuntimeError:
    first = str(err).splitlines()[0] if str(err) else ""
    return RuntimeError(
        f"could not load the captioner {path!r}: it is not a local directory and fetching it from the "
        f"Hugging Face hub failed ({type(err).__name__}: {first}). On a machine with network access run "
        f"`hf download {path} --local-dir DIR` and set captioner.path=DIR.")


def load_processor(path: str, trust_remote_code: bool = False):
    """``AutoProcessor``, or the processor class without its video processor when torchvision is missing."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as err:
        name = _processor_class_name(path)
        if not name:
            if os.path.isdir(path):
                raise
            raise _hub_error(path, err) from err
        from transformers.models.auto.processing_auto import processor_class_from_name

        cls = processor_class_from_name(name)
        if cls is None:
            raise
        return no_video_processor_class(cls).from_pretrained(path, trust_remote_code=trust_remote_code)


def load_model(path: str, settings: HFSettings):
    """The image-text-to-text model at ``path`` (directory or hub name), in eval mode on the chosen device."""
    from transformers import AutoModelForImageTextToText

    if not os.path.isdir(path) and (path.startswith(("/", ".", "~")) or path.count("/") != 1):
        raise FileNotFoundError(f"captioner checkpoint directory {path!r} not found (nor a hub name)")
    device = resolve_device(settings.device)
    kw = {"dtype": torch_dtype(settings.dtype, device), "trust_remote_code": settings.trust_remote_code}
    if settings.attn_implementation:
        kw["attn_implementation"] = settings.attn_implementation
    try:
        model = AutoModelForImageTextToText.from_pretrained(path, **kw)
    except (OSError, ValueError) as err:
        if os.path.isdir(path):
            raise
        raise _hub_error(path, err) from err
    return model.to(device).eval()


def language_model_prefix(model) -> str:
    """Dotted name of the language model inside a VLM (``model.language_model`` in the supported families)."""
    names = [n for n, _ in model.named_modules() if n.split(".")[-1] == "language_model"]
    if names:
        return min(names, key=len)
    dec = model.get_decoder() if hasattr(model, "get_decoder") else None
    for n, m in model.named_modules():
        if m is dec:
            return n
    return ""


def train_language_model_only(model) -> None:
    """Freeze every weight outside the language model and the output head (a full fine-tune)."""
    lm = language_model_prefix(model)
    for name, p in model.named_parameters():
        if not name.startswith((lm + ".", "lm_head")):
            p.requires_grad_(False)


def enable_checkpointing(model) -> None:
    """Gradient checkpointing (non-reentrant) with the input-gradient hook on the language model's token
    embedding only: transformers hooks every sub-model's input embedding, the vision patch embedding included,
    which makes every update back-propagate through the frozen, checkpointed vision tower."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.disable_input_require_grads()
    model._require_grads_hooks = [model.get_input_embeddings().register_forward_hook(
        lambda _m, _i, out: out.requires_grad_(True))]


@contextlib.contextmanager
def quiet():
    """Silence deprecation notices about library internals (PEFT reads ``is_gradient_checkpointing``)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        yield


# --- LoRA ---------------------------------------------------------------------------------------------------
@dataclass
class HFLora:
    """The captioner's LoRA settings, ``targets`` naming Hugging Face layers (a regex or :data:`ALL_LINEAR`)."""

    enabled: bool = True
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    targets: str = DEFAULT_TARGETS


def lora_from_peft(model) -> HFLora:
    """The LoRA settings of a loaded PEFT model's active adapter (rank, alpha, dropout, targets as saved)."""
    cfg = model.peft_config[model.active_adapter]
    targets = cfg.target_modules
    if not isinstance(targets, str):
        targets = "|".join(sorted(re.escape(t) for t in targets or ()))
    return HFLora(enabled=True, r=int(cfg.r), alpha=int(cfg.lora_alpha), dropout=float(cfg.lora_dropout or 0.0),
                  targets=targets)


def lora_from_adapter_dir(path: str) -> HFLora:
    """The shape (rank, alpha, targets) of the adapter saved in ``path``, for a new adapter of the same shape."""
    with open(os.path.join(path, "adapter_config.json")) as fh:
        cfg = json.load(fh)
    targets = cfg.get("target_modules") or DEFAULT_TARGETS
    if not isinstance(targets, str):
        targets = r".*\.(" + "|".join(sorted(re.escape(t.split(".")[-1]) for t in targets)) + ")"
    return HFLora(enabled=True, r=int(cfg.get("r", 16)), alpha=int(cfg.get("lora_alpha", 32)), targets=targets)


def lora_settings(lora: Any) -> HFLora:
    """:class:`HFLora` from a config's ``lora`` section (None: no LoRA)."""
    if lora is None:
        return HFLora(enabled=False)

    out = HFLora(**{f.name: getattr(lora, f.name) for f in fields(HFLora) if hasattr(lora, f.name)})
    if not out.targets or out.targets == LoraSettings().targets:   # the tiny default names no HF layer
        out.targets = DEFAULT_TARGETS
    return out


def lora_target_modules(model, regex: str, freeze_vision: bool = True) -> list[str]:
    """Names of the linear layers LoRA adapts: ``all-linear`` (the default): every linear layer of the language
    model (never the vision tower, the projector or the output head); else the full matches of ``regex``,
    inside the language model when ``freeze_vision``."""
    lm = language_model_prefix(model)
    if regex == ALL_LINEAR:
        names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and lm
                 and n.startswith(lm + ".")]
        if not names:
            raise ValueError(f"the language model ({lm or 'not found'}) has no linear layer to adapt")
        return names
    pat = re.compile(regex)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and pat.fullmatch(n)
             and (not freeze_vision or n.startswith(lm + "."))]
    if not names:
        raise ValueError(f"LoRA target regex {regex!r} matches no linear layer of the language model "
                         f"({lm or 'unknown'}); e.g. {DEFAULT_TARGETS!r}")
    return names


def add_adapter(model, lora: HFLora, freeze_vision: bool = True):
    """``model`` as a ``PeftModel`` with a new LoRA adapter of ``lora``'s shape on :func:`lora_target_modules`.
    Dropout is refused: it would make the update's log-probs differ from the sampling policy's."""
    from peft import LoraConfig, get_peft_model

    if lora.dropout > 0:
        raise ValueError(
            f"captioner.lora.dropout={lora.dropout}: dropout makes the update's log-probs differ from "
            f"the sampling policy's, so the PPO ratio is not 1 on the on-policy step; use 0")
    targets = lora_target_modules(model, lora.targets, freeze_vision)
    with quiet():
        config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=0.0, target_modules=targets)
        return get_peft_model(model, config)
