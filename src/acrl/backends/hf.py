"""Hugging Face vision-language captioners (Qwen2-VL, Qwen2.5-VL, InternVL, Llava) as a ``Policy``.

``HFCaptioner`` wraps an ``AutoModelForImageTextToText`` checkpoint and its processor:

* the user turn is ``[image, captioner_prompt(question)]`` rendered by the processor's chat template (which
  writes the special tokens itself: the processor then adds none, so no second BOS); images larger than
  ``max_pixels`` are downscaled first. Each problem is encoded once by the processor; rows are batched the way
  the processor batches (:func:`_collate`: left padding, per-image tensors such as Idefics3's tiles or
  LLaVA-OneVision's patches zero-padded to the largest), so any family the processor supports batches;
* positions come from the attention mask: the model's own M-RoPE indices for the Qwen-VL families (its
  ``rope_deltas`` recomputed at every prefill and expanded to the rows sharing a prompt), else the running
  count of attended tokens;
* one sampler: each distinct prompt is prefilled once (KV cache on), the cache is expanded to the problem's
  ``n`` rows and the captions are sampled in a plain decode loop over it (``top_p``: from the renormalised
  nucleus). Its per-token log-probs are kept only to measure the sampler/trainer mismatch
  (:meth:`HFCaptioner.logprob_mismatch`);
* one teacher-forced log-prob function (:meth:`HFCaptioner.logprobs`) gives the old log-probs of a sampled
  rollout, the update's and π_ref's: same row chunks (``logprob_batch_size``, else the trainer's micro-batch),
  same mode (dropout off, see :meth:`HFCaptioner._policy_mode`), same distribution as the sampler's
  (temperature, banned tokens, nucleus), so the PPO ratio of the on-policy step is 1 up to nothing. It only
  materialises the logits of the caption positions, reduced one row at a time (:func:`token_logprobs`). With
  ``share_prompt_cache`` (default, not under gradient checkpointing, which drops the cache) it runs each
  prompt once per chunk and the captions over the expanded cache, keeping the gradient through the cached
  prompt keys/values; else every row runs prompt + caption. The choice is fixed per captioner, so old and new
  log-probs always come from the same numerics;
* gradient checkpointing hooks only the language model's token embedding (the frozen vision tower is never
  back-propagated through); in a per-row pass the frozen vision tower runs once per problem, not once per row
  (:meth:`HFCaptioner._image_features_once`);
* :meth:`HFCaptioner.self_test` (run by :meth:`HFCaptioner.load`): incremental decode vs teacher-forced
  log-probs on two left-padded rows with images of different sizes, and a non-zero LoRA target count;
* PEFT LoRA on every linear layer of the language model (vision tower and projector frozen by default); the
  reference π_ref is the same weights under ``disable_adapter()``. Without LoRA a frozen copy is kept.
  Training that starts from an adapter (an SFT or an earlier run) merges it into the base weights first and
  trains a new adapter on top, so π_ref (adapter disabled) is the starting checkpoint; the merged adapters are
  copied into every saved checkpoint (``reference/``) so that a resumed run rebuilds the same π_ref. A
  ``reference`` checkpoint that is not the policy's own starting point is loaded as a separate frozen model;
* ``save`` writes a standard PEFT adapter directory plus ``acrl_captioner.json`` pointing at the base model;
  :func:`export_merged` writes a merged, stand-alone checkpoint.

Devices: ``cuda`` means this process's GPU (``cuda:LOCAL_RANK`` under a launcher, :func:`resolve_device`), and
every public method runs under that device (:func:`device_scope`): CUDA's current device is per thread, and
the trainer calls the clarifier from a worker thread.

Without torchvision, processors that require a video processor (Qwen-VL, InternVL) can't be built by
``AutoProcessor``; :func:`load_processor` then falls back to :func:`no_video_processor_class`.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import json
import os
import re
import tempfile
import warnings
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from acrl.config import HFSettings, LoraSettings
from acrl.rollout.prompts import captioner_prompt, clarify_prompt
from acrl.rollout.protocols import Rollout

META_FILE = "acrl_captioner.json"
REFERENCE_DIR = "reference"          # inside a saved checkpoint: the adapters merged into π_ref, in order
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
DEFAULT_LOGPROB_ROWS = 8             # rows per teacher-forced forward when neither setting names a number
ALL_LINEAR = "all-linear"           # LoRA targets: every linear layer of the language model (not the head)
DEFAULT_TARGETS = ALL_LINEAR
_SEQ_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")




@dataclass
class _Lora:
    enabled: bool = True
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    targets: str = DEFAULT_TARGETS


def _lora_from_peft(model) -> _Lora:
    """The LoRA settings of a loaded PEFT model's active adapter (rank, alpha, dropout, targets as saved)."""
    cfg = model.peft_config[model.active_adapter]
    targets = cfg.target_modules
    if not isinstance(targets, str):
        targets = "|".join(sorted(re.escape(t) for t in targets or ()))
    return _Lora(enabled=True, r=int(cfg.r), alpha=int(cfg.lora_alpha), dropout=float(cfg.lora_dropout or 0.0),
                 targets=targets)


def _lora_from_adapter_dir(path: str) -> _Lora:
    """The shape (rank, alpha, targets) of the adapter saved in ``path``, for a new adapter of the same shape."""
    with open(os.path.join(path, "adapter_config.json")) as fh:
        cfg = json.load(fh)
    targets = cfg.get("target_modules") or DEFAULT_TARGETS
    if not isinstance(targets, str):
        targets = r".*\.(" + "|".join(sorted(re.escape(t.split(".")[-1]) for t in targets)) + ")"
    return _Lora(enabled=True, r=int(cfg.get("r", 16)), alpha=int(cfg.get("lora_alpha", 32)), targets=targets)


def _lora_settings(lora: Any) -> _Lora:
    if lora is None:
        return _Lora(enabled=False)

    out = _Lora(**{f.name: getattr(lora, f.name) for f in fields(_Lora) if hasattr(lora, f.name)})
    if not out.targets or out.targets == LoraSettings().targets:   # the tiny default names no HF layer
        out.targets = DEFAULT_TARGETS
    return out


# --- loading ------------------------------------------------------------------------------------------------
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


def _read_json(path: str, name: str) -> dict | None:
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
        data = _read_json(path, name) or {}
        if data.get("processor_class"):
            return data["processor_class"]
    model_type = (_read_json(path, "config.json") or {}).get("model_type")
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


def _torch_dtype(name: str, device: str) -> torch.dtype:
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


def _on_device(method):
    """Run a public method of an object with a ``device`` attribute under :func:`device_scope`."""
    @functools.wraps(method)
    def run(self, *args, **kwargs):
        with device_scope(self.device):
            return method(self, *args, **kwargs)
    return run


def load_model(path: str, settings: HFSettings):
    """The image-text-to-text model at ``path`` (directory or hub name), in eval mode on the chosen device."""
    from transformers import AutoModelForImageTextToText

    if not os.path.isdir(path) and (path.startswith(("/", ".", "~")) or path.count("/") != 1):
        raise FileNotFoundError(f"captioner checkpoint directory {path!r} not found (nor a hub name)")
    device = resolve_device(settings.device)
    kw = {"dtype": _torch_dtype(settings.dtype, device), "trust_remote_code": settings.trust_remote_code}
    if settings.attn_implementation:
        kw["attn_implementation"] = settings.attn_implementation
    try:
        model = AutoModelForImageTextToText.from_pretrained(path, **kw)
    except (OSError, ValueError) as err:
        if os.path.isdir(path):
            raise
        raise _hub_error(path, err) from err
    return model.to(device).eval()


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


def _identity(path: str) -> str:
    return os.path.realpath(path) if os.path.exists(path) else path


def lineage(path: str) -> tuple[str, tuple[str, ...]]:
    """What a checkpoint's weights are: (base model, adapters applied in order), by origin, to tell whether two
    checkpoints are the same model without loading them."""
    base, adapter = resolve_checkpoint(path)
    _, sources = reference_adapters(path)
    return _identity(base), tuple(sources) + ((_identity(adapter),) if adapter else ())


def _merge_adapters(model, adapters: list[str]):
    """``model`` with each PEFT adapter directory of ``adapters`` merged into its weights, in order."""
    from peft import PeftModel

    for a in adapters:
        with _quiet():
            model = PeftModel.from_pretrained(model, a).merge_and_unload()
    return model


def load_merged_model(path: str, settings: HFSettings):
    """The plain model of a checkpoint, with its reference adapters and its adapter (if any) merged in (frozen
    references, exports)."""
    base, adapter = resolve_checkpoint(path)
    refs, _ = reference_adapters(path)
    return _merge_adapters(load_model(base, settings), refs + ([adapter] if adapter else []))


# --- batching -----------------------------------------------------------------------------------------------
@dataclass
class HFContext:
    """Per-problem processor outputs (batch of 1, on CPU); rollout row ``r`` uses problem ``r // n``.
    ``sampler_logprobs``: the sampler's own log-probs of the rollout's tokens (the mismatch metric only)."""

    encodings: list[dict[str, torch.Tensor]]
    n: int
    sampler_logprobs: torch.Tensor | None = None
    top_p: float = 1.0          # the nucleus the captions were drawn from (1: none; greedy rollouts)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0,
                   banned: torch.Tensor | None = None, top_p: float = 1.0) -> torch.Tensor:
    """Log-probs of ``tokens`` under the sampling distribution of ``logits`` (``(rows, t, V)`` in any dtype;
    ``tokens``: (rows, t)), in fp32: ``softmax(logits / T)`` over the allowed tokens, restricted to the nucleus
    of mass ``top_p`` and renormalised (the chosen token always counted in, so a token the sampler drew at a
    float-rounding boundary never gets -inf). The chosen token's logit minus a logsumexp, one row at a time: the
    largest temporary is one row's (t, V) fp32 logits, never the chunk's (as TRL's ``selective_log_softmax``)."""
    out = []
    for r in range(logits.shape[0]):
        row = _ban(logits[r].float(), banned) / temperature
        tok = tokens[r, :, None].to(row.device)
        if top_p < 1.0:
            row = _top_p(torch.log_softmax(row, -1), top_p, keep=tok)
        out.append(row.gather(-1, tok)[:, 0] - torch.logsumexp(row, -1))
    return torch.stack(out) if out else logits.new_zeros(tokens.shape, dtype=torch.float32)


def row_chunks(start: int, stop: int, chunk: int) -> list[tuple[int, int]]:
    """``[start, stop)`` cut at the multiples of ``chunk``: the same rows always share a forward, whichever slice
    of the rollout is asked for (a micro-batch that is a multiple of ``chunk`` runs the recompute's chunks)."""
    out, a = [], start
    while a < stop:
        b = min(stop, (a // chunk + 1) * chunk)
        out.append((a, b))
        a = b
    return out


def _top_p(logp: torch.Tensor, top_p: float, keep: torch.Tensor | None = None) -> torch.Tensor:
    """``logp`` (..., V) with the tokens outside the nucleus (the shortest prefix of mass >= ``top_p``) set to
    -inf; ``keep`` (..., 1): token ids kept whatever their rank."""
    if top_p >= 1.0:
        return logp
    srt, idx = logp.sort(-1, descending=True)
    drop = srt.exp().cumsum(-1) - srt.exp() > top_p
    if keep is not None:
        drop &= idx != keep
    return logp.scatter(-1, idx, srt.masked_fill(drop, float("-inf")))


_PER_LAYER = ("deepstack_features", "hidden_states", "attentions")   # vision-output fields holding one entry per layer


def _cat_features(outs: list, per_layer: bool = False):
    """The outputs of a vision encoder run on single images, combined as one run on all of them returns them:
    tensors concatenated along the first dim, sequences of per-image tensors chained, per-layer sequences
    (``per_layer``, the :data:`_PER_LAYER` fields, e.g. Qwen3-VL's deep-stack features) and sequences of
    sequences combined element-wise, output records field by field."""
    first = outs[0]
    if first is None:
        return None
    if torch.is_tensor(first):
        return torch.cat(outs, 0)
    if isinstance(first, (list, tuple)):
        if not per_layer and all(torch.is_tensor(x) for x in first):
            return type(first)(x for o in outs for x in o)
        return type(first)(_cat_features([o[i] for o in outs]) for i in range(len(first)))
    if isinstance(first, dict):     # transformers' ModelOutput records are dicts
        out = copy.copy(first)
        for k in first.keys():
            out[k] = _cat_features([o[k] for o in outs], per_layer=k in _PER_LAYER)
        return out
    raise TypeError(f"cannot combine vision outputs of type {type(first).__name__}")


def _pad_to(t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """``t`` zero-padded at the end of every dim but the first to ``shape[1:]``."""
    pad: list[int] = []
    for have, want in zip(reversed(t.shape[1:]), reversed(shape[1:])):
        pad += [0, want - have]
    return F.pad(t, pad) if any(pad) else t


def _collate(encs: list[dict[str, torch.Tensor]], pad_id: int, tails: torch.Tensor | None = None,
             device: str = "cpu") -> dict[str, torch.Tensor]:
    """Batch per-problem processor outputs the way the processor batches a list: token rows left-padded (mask 0,
    type 0), every other tensor concatenated along its first dim after zero-padding the rest to the largest
    (Idefics3's tiles and ``pixel_attention_mask``, LLaVA-OneVision's patches: padded images the models drop;
    Qwen's flat patch lists and grids: plain concatenation). ``tails`` (caption tokens: mask 1, type 0) are
    appended on the right."""
    width = max(e["input_ids"].shape[1] for e in encs)
    out: dict[str, Any] = {}
    ids, att, types = [], [], {}
    for e in encs:
        k = width - e["input_ids"].shape[1]
        ids.append(F.pad(e["input_ids"][0], (k, 0), value=pad_id))
        att.append(F.pad(torch.ones(e["input_ids"].shape[1], dtype=torch.long), (k, 0), value=0))
        for key in ("mm_token_type_ids", "token_type_ids"):
            if key in e:
                types.setdefault(key, []).append(F.pad(e[key][0], (k, 0), value=0))
    out["input_ids"], out["attention_mask"] = torch.stack(ids), torch.stack(att)
    out.update({k: torch.stack(v) for k, v in types.items()})
    if tails is not None:
        out["input_ids"] = torch.cat([out["input_ids"], tails], 1)
        out["attention_mask"] = torch.cat([out["attention_mask"], torch.ones_like(tails)], 1)
        for k in types:
            out[k] = torch.cat([out[k], torch.zeros_like(tails, dtype=out[k].dtype)], 1)
    for key in encs[0]:
        if key not in _SEQ_KEYS:
            parts = [e[key] for e in encs]
            shape = tuple(max(p.shape[d] for p in parts) for d in range(parts[0].dim()))
            out[key] = torch.cat([_pad_to(p, shape) for p in parts], 0)
    return {k: v.to(device) for k, v in out.items()}


def pad_rollout(roll: Rollout, width: int, pad_id: int) -> Rollout:
    """``roll`` with tokens / mask / log-probs right-padded to ``width`` columns (the generation cap), so that
    the rollout's width is a constant across steps and ranks (never cut: a wider rollout stays as it is)."""
    extra = width - roll.tokens.shape[1]
    if extra > 0:
        roll.tokens = F.pad(roll.tokens, (0, extra), value=pad_id)
        roll.mask = F.pad(roll.mask, (0, extra))
        roll.logprobs = F.pad(roll.logprobs, (0, extra))
    return roll


# --- the policy ---------------------------------------------------------------------------------------------
class HFCaptioner:
    """``Policy`` over a Hugging Face image-text-to-text model (PEFT LoRA or full fine-tuning)."""

    rollout_engine = None   # samples captions and π_ref's answers instead (acrl.backends.vllm_engine); None: HF

    def before_update(self) -> None:
        """Called by the trainer before each optimisation step: the rollout engine frees the GPU."""
        if self.rollout_engine is not None:
            self.rollout_engine.sleep()

    def after_update(self) -> None:
        """Called by the trainer after each optimisation step: the rollout engine gets the new adapter."""
        if self.rollout_engine is not None:
            self.rollout_engine.push_adapter()

    def set_sampling_seed(self, seed: int) -> None:
        """Called by the trainer before each step with a seed derived from (train.seed, step, rank): a rollout
        engine seeds its requests from it, so a resumed run samples as the uninterrupted one (HF sampling draws
        from torch's RNG, whose CPU and CUDA states the checkpoint restores)."""
        if self.rollout_engine is not None:
            self.rollout_engine.sampling_seed = seed

    def __init__(self, model, processor, lora: Any = None, settings: HFSettings | None = None,
                 base_path: str = "", reference_model=None, micro_batch: int = 0,
                 reference_adapters: list[str] | None = None, reference_sources: list[str] | None = None):
        """``model``: a plain model (a new adapter is added when ``lora.enabled``) or a ``PeftModel`` (its adapter
        keeps training with its own settings). ``reference_model``: π_ref as a separate frozen model (default:
        LoRA: the adapter disabled; full fine-tune: a frozen copy). ``micro_batch``: the trainer's rows per
        forward/backward (``train.micro_batch``), the row chunk of every teacher-forced pass unless
        ``settings.logprob_batch_size`` is set. ``reference_adapters`` / ``reference_sources``: adapter
        directories already merged into ``model``'s weights (π_ref = base + them), and where they came from;
        saved with every checkpoint."""
        from peft import PeftModel

        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.settings = settings or HFSettings()
        self.base_path = base_path
        self.micro_batch = int(micro_batch or 0)
        self.reference_adapters = list(reference_adapters or [])
        self.reference_sources = list(reference_sources or self.reference_adapters)
        self.device = str(next(model.parameters()).device)
        self.lora = _lora_settings(lora)
        if isinstance(model, PeftModel):
            self.lora = _lora_from_peft(model)   # rank, alpha, targets as saved: the engine must match them
            self.model = model
            self.ref_model = None
        elif self.lora.enabled:
            from peft import LoraConfig, get_peft_model

            if self.lora.dropout > 0:
                raise ValueError(
                    f"captioner.lora.dropout={self.lora.dropout}: dropout makes the update's log-probs differ from "
                    f"the sampling policy's, so the PPO ratio is not 1 on the on-policy step; use 0")
            targets = self.lora_target_modules(model, self.lora.targets, self.settings.freeze_vision)
            with _quiet():
                config = LoraConfig(r=self.lora.r, lora_alpha=self.lora.alpha, lora_dropout=0.0,
                                    target_modules=targets)
                self.model = get_peft_model(model, config)
            self.ref_model = None
        else:
            self.model = model
            self.ref_model = (reference_model or copy.deepcopy(model)).eval().requires_grad_(False)
            if self.settings.freeze_vision:
                lm = _language_model_prefix(model)
                for name, p in model.named_parameters():
                    if not name.startswith((lm + ".", "lm_head")):
                        p.requires_grad_(False)
        if self.lora.enabled and reference_model is not None:
            self.ref_model = reference_model.eval().requires_grad_(False)
        if self.lora.enabled:
            peft_cfg = self.model.peft_config[self.model.active_adapter]
            peft_cfg.base_model_name_or_path = base_path or peft_cfg.base_model_name_or_path
        if self.settings.gradient_checkpointing:
            enable_checkpointing(self.base_model())
        gc = self.base_model().generation_config
        eos = gc.eos_token_id if gc.eos_token_id is not None else self.tokenizer.eos_token_id
        self.eos_ids = [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]
        pad = gc.pad_token_id if gc.pad_token_id is not None else self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else self.eos_ids[0])
        self._mrope = hasattr(getattr(self.base_model(), "model", None), "rope_deltas")   # M-RoPE offsets there
        params = inspect.signature(self.base_model().forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self.banned = self._banned_tokens()
        self.model.eval()

    # --- construction / persistence -------------------------------------------------------------------------
    @staticmethod
    def lora_target_modules(model, regex: str, freeze_vision: bool = True) -> list[str]:
        """Names of the linear layers LoRA adapts: ``all-linear`` (the default): every linear layer of the language
        model (never the vision tower, the projector or the output head); else the full matches of ``regex``,
        inside the language model when ``freeze_vision``."""
        lm = _language_model_prefix(model)
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

    @classmethod
    def load(cls, path: str, lora: Any = None, settings: HFSettings | None = None,
             reference: str | None = None, micro_batch: int = 0) -> HFCaptioner:
        """Load a base checkpoint (local directory or hub name), an ``HFCaptioner.save`` directory (adapter +
        json pointing at the base) or a plain PEFT adapter directory.

        ``reference``: π_ref's checkpoint. The same checkpoint as ``path`` means training *starts* here: a saved
        adapter is merged into the base weights and a new adapter (``lora``'s settings, or the saved adapter's
        shape when ``lora`` is None) trains on top, so π_ref is this checkpoint. A different one (or None) means
        ``path`` *continues* a run: its adapter keeps training with its own rank/targets, and π_ref is what the
        adapter is disabled to (the base plus the adapters the run started from); if ``reference`` names another
        model, that one is loaded as a separate frozen π_ref. With ``lora.enabled: false`` a saved adapter is
        merged and all weights train (π_ref: a frozen copy, or ``reference``).
        ``micro_batch``: the trainer's ``train.micro_batch`` (see :class:`HFCaptioner`).
        """
        settings = settings or HFSettings()
        base, adapter = resolve_checkpoint(path)
        refs, sources = reference_adapters(path)
        model = _merge_adapters(load_model(base, settings), refs)
        processor = load_processor(base, settings.trust_remote_code)
        wants_lora = getattr(lora, "enabled", False) if adapter is None else getattr(lora, "enabled", True)
        starts_here = reference is not None and lineage(reference) == lineage(path)
        new_lora = lora
        if adapter is not None and wants_lora and not starts_here:     # continue the saved adapter
            from peft import PeftModel

            with _quiet():
                model = PeftModel.from_pretrained(model, adapter, is_trainable=True)
        elif adapter is not None:                                       # start from it: merge it into π_ref
            model = _merge_adapters(model, [adapter])
            if wants_lora:
                refs, sources = refs + [adapter], sources + [_identity(adapter)]
                new_lora = lora if lora is not None else _lora_from_adapter_dir(adapter)
        own = (_identity(base), tuple(sources)) if wants_lora else lineage(path)   # π_ref of this policy
        ref = None
        if reference and lineage(reference) != own:
            ref = load_merged_model(reference, settings)
        cap = cls(model, processor, new_lora, settings, base_path=base, reference_model=ref,
                  micro_batch=micro_batch, reference_adapters=refs if wants_lora else [],
                  reference_sources=sources if wants_lora else [])
        if settings.self_test:
            report = cap.self_test()
            if not report["ok"]:
                raise ValueError(f"captioner {path!r} failed its start-up self-test: {report['problem']} "
                                   f"(captioner.self_test: false skips it)")
        return cap

    def base_model(self):
        return self.model.get_base_model() if self.lora.enabled else self.model

    def save(self, path: str) -> None:
        """LoRA: a standard PEFT directory + ``acrl_captioner.json`` naming the base, and the adapters merged
        into π_ref copied to ``reference/<i>`` (then the adapter applies to base + those, in order:
        ``load_merged_model`` and ``export_merged`` do that; plain ``PeftModel.from_pretrained(base, path)`` only
        when there are none). Full fine-tune: the whole model and processor (``save_pretrained``)."""
        import shutil

        os.makedirs(path, exist_ok=True)
        meta: dict[str, Any] = {}
        if self.lora.enabled:
            self.model.save_pretrained(path)
            base = self.base_path
            if base and os.path.isdir(base):
                base = os.path.abspath(base)
            rels = []
            for i, src in enumerate(self.reference_adapters):
                rel = os.path.join(REFERENCE_DIR, str(i))
                dst = os.path.join(path, rel)
                if not (os.path.isdir(dst) and os.path.samefile(src, dst)):
                    os.makedirs(dst, exist_ok=True)
                    for f in ADAPTER_FILES:
                        if os.path.exists(os.path.join(src, f)):
                            shutil.copyfile(os.path.join(src, f), os.path.join(dst, f))
                rels.append(rel)
            if rels:
                meta = {"reference_adapters": rels, "reference_sources": self.reference_sources}
        else:
            self.model.save_pretrained(path)
            self.processor.save_pretrained(path)
            base = "."
        with open(os.path.join(path, META_FILE), "w") as fh:
            json.dump({"format": 1, "backend": "hf", "base": base, "lora": self.lora.enabled,
                       "model_type": getattr(self.base_model().config, "model_type", ""), **meta}, fh, indent=1)

    def reference_checkpoint(self, out: str) -> str:
        """A directory holding π_ref's weights as one plain checkpoint, for engines that load a model by path
        (vLLM): the base checkpoint itself when no adapter was merged into it, else the merged weights (exactly
        the training model's, adapter layers stripped) written to ``out``."""
        if not self.lora.enabled or not self.reference_adapters:
            return self.base_path
        base = self.base_model()
        state = {k.replace(".base_layer.", "."): v for k, v in base.state_dict().items() if "lora_" not in k}
        os.makedirs(out, exist_ok=True)
        with _quiet():
            base.save_pretrained(out, state_dict=state)
        self.processor.save_pretrained(out)
        return out

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.base_model().parameters())

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """What the optimiser updates (LoRA: the adapter, kept in fp32 by PEFT). A full fine-tune refuses weights
        in bf16/fp16: AdamW would update them in place with no fp32 master copy, and at learning rates like
        1e-5 most updates round away."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        low = sorted({str(p.dtype).removeprefix("torch.") for p in params if p.dtype in (torch.bfloat16,
                                                                                           torch.float16)})
        if low and not self.lora.enabled:
            raise ValueError(
                f"full fine-tuning of {'/'.join(low)} weights: AdamW has no fp32 master weights here and most "
                f"updates round away; use LoRA (captioner.lora.enabled: true) or captioner.dtype: fp32")
        return params

    @contextlib.contextmanager
    def _reference(self):
        if self.ref_model is not None:
            yield self.ref_model
        else:
            with self.model.disable_adapter():
                yield self.base_model()

    @contextlib.contextmanager
    def _policy_mode(self):
        """The mode of every π_θ teacher-forced pass, old log-probs and update alike: train mode (gradient
        checkpointing is active only there) with every dropout layer off (LoRA dropout of a loaded adapter
        included), so both passes compute the same function. Back to eval mode afterwards."""
        self.model.train()
        for m in self.model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.eval()
        try:
            yield self.base_model()
        finally:
            self.model.eval()

    def _banned_tokens(self) -> torch.Tensor:
        """Ids a caption never contains: image/video placeholders and markers, padding (unless it ends a
        caption), and the unused rows of a head larger than the tokenizer. Masked in sampling and in every
        log-prob."""
        ids: set[int] = set()
        cfg = self.base_model().config
        for src in (cfg, self.processor, self.tokenizer):
            for key in dir(src) if src is not cfg else list(cfg.to_dict()):
                if key.endswith(("_token_id", "_token_index")) and not key.startswith(("eos", "bos", "pad")):
                    with contextlib.suppress(Exception):
                        v = getattr(src, key)
                        if isinstance(v, int) and v >= 0:
                            ids.add(v)
        if self.pad_id not in self.eos_ids:
            ids.add(self.pad_id)
        vocab = self.base_model().get_output_embeddings().weight.shape[0]
        ids |= set(range(len(self.tokenizer), vocab))
        return torch.tensor(sorted(i for i in ids if i < vocab and i not in self.eos_ids), dtype=torch.long)

    # --- encoding -------------------------------------------------------------------------------------------
    def _fit(self, image: Image.Image) -> Image.Image:
        image = image.convert("RGB")
        cap = self.settings.max_pixels
        if cap and image.width * image.height > cap:
            s = (cap / (image.width * image.height)) ** 0.5
            image = image.resize((max(1, int(image.width * s)), max(1, int(image.height * s))), Image.BICUBIC)
        return image

    def encode(self, image: Image.Image, text: str) -> dict[str, torch.Tensor]:
        """Processor output for one user turn ``[image, text]`` + the generation prompt (batch of 1). The chat
        template writes the special tokens (BOS included), so the processor adds none."""
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        prompt = self.processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        enc = self.processor(text=[prompt], images=[[self._fit(image)]], return_tensors="pt",
                             add_special_tokens=False, **(self.settings.processor_kwargs or {}))
        return {k: v for k, v in enc.items() if isinstance(v, torch.Tensor) and k != "attention_mask"}

    # --- the model's passes ---------------------------------------------------------------------------------
    def _positions(self, att: torch.Tensor, t: int, deltas: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``position_ids`` of the last ``t`` tokens of rows with attention mask ``att``: the count of attended
        tokens before each. M-RoPE models: nothing for a prefill (the model computes its 3-D positions from the
        mask and the image grids, and its ``rope_deltas``); after one, the text position plus the row's delta."""
        pos = (att.cumsum(-1) - 1).clamp(min=0)[:, -t:]
        if not self._mrope:
            return {"position_ids": pos}
        if deltas is None:
            return {}
        return {"position_ids": (pos + deltas.to(pos.device)).unsqueeze(0).expand(3, -1, -1)}

    def _prefix(self, model, encs: list[dict], groups: list[int]):
        """Forward of the distinct prompts ``encs`` (KV cache on), expanded to rows (``groups[r]``: index into
        ``encs``): (cache, attention mask, logits after the prompt, M-RoPE deltas or None), all with
        ``len(groups)`` rows. The model's ``rope_deltas`` are reset, recomputed by this prefill and expanded."""
        batch = _collate(encs, self.pad_id, device=self.device)
        att = batch["attention_mask"]
        if self._mrope:
            model.model.rope_deltas = None
        out = model(**batch, **self._positions(att, att.shape[1]), use_cache=True, logits_to_keep=1)
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        logits = out.logits[:, -1]
        deltas = model.model.rope_deltas if self._mrope else None
        if deltas is None and self._mrope:
            raise RuntimeError("the M-RoPE model computed no rope_deltas in its prefill")
        if groups != list(range(len(encs))):
            idx = torch.tensor(groups, device=att.device)
            cache.batch_select_indices(idx)
            att, logits = att[idx], logits[idx]
            deltas = deltas[idx.to(deltas.device)] if deltas is not None else None
        return cache, att, logits, deltas

    def _extend(self, model, cache, att: torch.Tensor, deltas, tokens: torch.Tensor, **kw):
        """Forward of ``tokens`` (rows, t) after what ``cache`` holds; returns (logits, extended mask)."""
        att = torch.cat([att, torch.ones_like(tokens)], 1)
        pos = self._positions(att, tokens.shape[1], deltas)
        out = model(input_ids=tokens, attention_mask=att, use_cache=True, **pos,
                    **{self._cache_kw: cache}, **kw)
        return out.logits, att

    @torch.no_grad()
    def _generate(self, model, encs: list[dict], rows_of: list[int], temperature: float, max_new: int,
                  greedy: bool, top_p: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sample rows (``rows_of[r]``: encoding index) in chunks of ``generation_batch_size``; tokens, mask,
        sampler log-probs (CPU, right-padded, zero after the first end token)."""
        chunk = self.settings.generation_batch_size or len(rows_of)
        parts = [self._sample_shared(model, encs, rows_of[i:i + chunk], temperature, max_new, greedy, top_p)
                 for i in range(0, len(rows_of), chunk)]
        width = max(g.shape[1] for g, _ in parts)
        tokens = torch.cat([F.pad(g, (0, width - g.shape[1]), value=self.pad_id) for g, _ in parts])
        lps = torch.cat([F.pad(lp, (0, width - lp.shape[1])) for _, lp in parts]).float()
        is_eos = torch.isin(tokens, torch.tensor(self.eos_ids))
        before = (is_eos.long().cumsum(1) - is_eos.long()) == 0     # up to and including the first end token
        mask = before.float()
        tokens = torch.where(before, tokens, torch.full_like(tokens, self.pad_id))
        return tokens, mask, torch.where(before, lps, torch.zeros_like(lps))

    def _sample_shared(self, model, encs: list[dict], rows_of: list[int], temperature: float, max_new: int,
                       greedy: bool, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The sampler: prefill each distinct prompt once, then sample all rows in a plain decode loop over the
        shared cache (given room for the ``max_new`` tokens up front, :func:`_with_room`). Tokens (pad after an
        end token) and the log-probs of the sampled tokens under the distribution they were drawn from (banned
        logits / T, nucleus renormalised), both (rows, steps) on CPU."""
        uniq = sorted(set(rows_of))
        where = {g: k for k, g in enumerate(uniq)}
        cache, att, logits, deltas = self._prefix(model, [encs[g] for g in uniq], [where[g] for g in rows_of])
        _with_room(cache, max_new)
        temp, top_p = (1.0, 1.0) if greedy else (temperature, top_p)
        banned = self.banned.to(logits.device)
        eos = torch.tensor(self.eos_ids, device=logits.device)
        done = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
        toks = [torch.zeros(logits.shape[0], 0, dtype=torch.long, device=logits.device)]
        lps = [torch.zeros(logits.shape[0], 0, device=logits.device)]
        for step in range(max_new):
            logp = torch.log_softmax(_ban(logits.float(), banned) / temp, -1)
            if top_p < 1.0:
                logp = torch.log_softmax(_top_p(logp, top_p), -1)
            if greedy:
                tok = logp.argmax(-1)
            else:
                # exponential race == multinomial over softmax(log-probs), without its per-row overhead
                race = torch.empty_like(logp).exponential_().log()
                tok = (logp - race).argmax(-1)
            tok = torch.where(done, torch.full_like(tok, self.pad_id), tok)
            toks.append(tok[:, None])
            lps.append(logp.gather(1, tok[:, None]))
            done |= torch.isin(tok, eos)
            if step == max_new - 1 or bool(done.all()):
                break
            logits, att = self._extend(model, cache, att, deltas, tok[:, None], logits_to_keep=1)
            logits = logits[:, -1]
        return torch.cat(toks, 1).cpu(), torch.cat(lps, 1).cpu()

    def _decode(self, tokens: torch.Tensor, mask: torch.Tensor) -> list[str]:
        rows = [t[: int(m.sum())].tolist() for t, m in zip(tokens, mask)]
        return [s.strip() for s in self.tokenizer.batch_decode(rows, skip_special_tokens=True)]

    @_on_device
    def generate(self, images: list[Image.Image], prompts: list[str], n: int = 1, temperature: float = 1.0,
                 max_new_tokens: int = 48, greedy: bool = False) -> Rollout:
        """``n`` captions per (image, question); ``prompts`` are questions for ``captioner_prompt``. With a
        ``rollout_engine`` (e.g. vLLM) the engine samples; the Rollout is the same either way. A sampled rollout's
        ``logprobs`` (the PPO's old log-probs) come from :meth:`logprobs` without gradient; the sampler's own are
        kept in ``context.sampler_logprobs`` (:meth:`logprob_mismatch`). Greedy rollouts (evaluation) keep the
        sampler's: nothing trains on them."""
        self.model.eval()
        if self.rollout_engine is not None:
            roll = self.rollout_engine.generate(images, prompts, n, temperature, max_new_tokens, greedy)
        else:
            encs = [self.encode(im, captioner_prompt(q)) for im, q in zip(images, prompts)]
            rows_of = [g for g in range(len(encs)) for _ in range(n)]
            tokens, mask, lps = self._generate(self.base_model(), encs, rows_of, temperature, max_new_tokens,
                                               greedy, self.settings.top_p)
            texts = self._decode(tokens, mask)
            roll = Rollout(texts=[texts[g * n:(g + 1) * n] for g in range(len(encs))], tokens=tokens, mask=mask,
                           logprobs=lps, temperature=1.0 if greedy else temperature, context=HFContext(encs, n))
        roll = pad_rollout(roll, max_new_tokens, self.pad_id)   # constant width: the length normaliser
        roll.context.sampler_logprobs = roll.logprobs
        roll.context.top_p = 1.0 if greedy else self.settings.top_p
        if not greedy:
            with torch.no_grad(), self._policy_mode() as model:
                roll.logprobs = self._logprobs(model, roll, 0, roll.tokens.shape[0])
        return roll

    @staticmethod
    def logprob_mismatch(rollout: Rollout) -> dict[str, float]:
        """How far the sampler's log-probs of a rollout's tokens are from the trainer's (its ``logprobs``): max and
        mean absolute difference over caption tokens, and the mean of ``exp(trainer - sampler) - 1``."""
        samp = getattr(rollout.context, "sampler_logprobs", None)
        m = rollout.mask > 0
        if samp is None or not bool(m.any()):
            return {"tokens": 0, "max_abs": 0.0, "mean_abs": 0.0, "ratio_mean_minus_1": 0.0}
        d = (rollout.logprobs - samp)[m]
        return {"tokens": int(m.sum()), "max_abs": float(d.abs().max()), "mean_abs": float(d.abs().mean()),
                "ratio_mean_minus_1": float(torch.exp(d).mean() - 1)}

    @_on_device
    @torch.no_grad()
    def answer(self, images: list[Image.Image], questions: list[str]) -> list[str]:
        """π_ref (adapter disabled / frozen copy) answers clarification questions, greedy."""
        if not images:
            return []
        if self.rollout_engine is not None and self.ref_model is None:   # the engine without adapter is π_ref
            return self.rollout_engine.answer(images, questions)
        encs = [self.encode(im, clarify_prompt(q)) for im, q in zip(images, questions)]
        with self._reference() as ref:
            ref.eval()
            tokens, mask, _ = self._generate(ref, encs, list(range(len(encs))), 1.0,
                                             self.settings.answer_max_new_tokens, greedy=True)
        return self._decode(tokens, mask)

    @_on_device
    @torch.no_grad()
    def policy_answer(self, images: list[Image.Image], questions: list[str]) -> list[str]:
        """Answers by the current policy (diagnostics; training uses the reference's answers)."""
        encs = [self.encode(im, clarify_prompt(q)) for im, q in zip(images, questions)]
        self.model.eval()
        tokens, mask, _ = self._generate(self.base_model(), encs, list(range(len(encs))), 1.0,
                                         self.settings.answer_max_new_tokens, greedy=True)
        return self._decode(tokens, mask)

    # --- log-probs ------------------------------------------------------------------------------------------
    def _shares_prompt(self) -> bool:
        """Whether the teacher-forced passes run prompts once per chunk: not under gradient checkpointing
        (checkpointed layers drop the KV cache), and then for *every* pass, with or without gradient, so that old
        and new log-probs come from the same numerics."""
        return self.settings.share_prompt_cache and not self.settings.gradient_checkpointing

    def logprob_rows(self) -> int:
        """Rows per teacher-forced forward: ``logprob_batch_size``, else the trainer's micro-batch, else 8."""
        return self.settings.logprob_batch_size or self.micro_batch or DEFAULT_LOGPROB_ROWS

    def _caption_logits(self, model, encs: list[dict], groups: list[int], tails: torch.Tensor,
                        shared: bool) -> torch.Tensor | list[torch.Tensor]:
        """Logits predicting each of the ``t`` caption tokens ``tails`` (rows, t); row ``r`` follows the prompt
        ``encs[groups[r]]``. The shared path returns them as consecutive pieces along t (no concatenated copy)."""
        t = tails.shape[1]
        if shared:   # prompt once per problem, then captions (but the last token) over the expanded cache
            cache, att, first, deltas = self._prefix(model, encs, groups)
            if t == 1:
                return [first[:, None]]
            logits, _ = self._extend(model, cache, att, deltas, tails[:, :-1].to(att.device))
            return [first[:, None], logits]
        batch = _collate([encs[g] for g in groups], self.pad_id, tails, self.device)
        if self._mrope:
            model.model.rope_deltas = None
        att = batch["attention_mask"]
        with self._image_features_once(model, encs, groups):
            return model(**batch, **self._positions(att, att.shape[1]), use_cache=False,
                         logits_to_keep=t + 1).logits[:, :-1]

    @contextlib.contextmanager
    def _image_features_once(self, model, encs: list[dict], groups: list[int]):
        """During one per-row forward: the vision tower runs once per problem (without gradient) instead of once
        per row. The model's ``get_image_features`` is replaced by one that encodes each distinct problem's image
        alone and hands every row its problem's features, concatenated as a batch's would be
        (:func:`_cat_features`). Only while no vision weight trains (the features take no gradient). The swap is
        on the model object: another thread must not run the same model meanwhile (the trainer's clarifier and its
        log-prob passes take turns through a lock)."""
        inner = getattr(model, "model", None)
        original = getattr(inner, "get_image_features", None)
        vision_trains = any(p.requires_grad for n, p in model.named_parameters()
                            if not n.startswith(_language_model_prefix(model) + ".") and "lm_head" not in n)
        if original is None or len(set(groups)) == len(groups) or vision_trains:
            yield
            return
        sig = inspect.signature(type(inner).get_image_features)   # of the function: (self, pixel_values, ...)
        var_kw = next((n for n, p in sig.parameters.items() if p.kind is inspect.Parameter.VAR_KEYWORD), None)

        def once(*args, **kwargs):
            bound = sig.bind(None, *args, **kwargs).arguments
            bound.pop(next(iter(sig.parameters)))
            memo = {}
            with torch.no_grad():
                for g in sorted(set(groups)):
                    call = dict(bound)
                    extra = dict(call.pop(var_kw, {}) or {})
                    for k, v in list(call.items()) + list(extra.items()):
                        if torch.is_tensor(v) and k in encs[g]:
                            own = encs[g][k].to(v.device)
                            (call if k in call else extra)[k] = own.to(v.dtype) if v.is_floating_point() else own
                    memo[g] = original(**call, **extra)
            return _cat_features([memo[g] for g in groups])

        own = inner.__dict__.get("get_image_features")
        inner.get_image_features = once
        try:
            yield
        finally:
            if own is None:
                del inner.get_image_features
            else:
                inner.get_image_features = own

    def _logprobs(self, model, rollout: Rollout, start: int, stop: int, shared: bool | None = None) -> torch.Tensor:
        """Log-probs of rows ``[start, stop)``, one forward per chunk of :func:`row_chunks`, each chunk's logits
        only over its caption positions and reduced by :func:`token_logprobs` before the next chunk runs.
        ``shared``: the prompt-sharing path or not (default: :meth:`_shares_prompt`)."""
        ctx: HFContext = rollout.context
        width = rollout.tokens.shape[1]
        shared = self._shares_prompt() if shared is None else shared
        top_p = getattr(ctx, "top_p", 1.0)
        parts = []
        for a, b in row_chunks(start, stop, self.logprob_rows()):
            mask = rollout.mask[a:b]
            t = max(1, int(mask.sum(1).max()))
            tails = rollout.tokens[a:b, :t]
            g0, g1 = a // ctx.n, (b - 1) // ctx.n + 1
            logits = self._caption_logits(model, ctx.encodings[g0:g1], [r // ctx.n - g0 for r in range(a, b)],
                                          tails, shared)
            safe = torch.where(mask[:, :t] > 0, tails, torch.full_like(tails, self.eos_ids[0]))  # no -inf * 0
            pieces, lps, k = logits if isinstance(logits, list) else [logits], [], 0
            del logits
            while pieces:
                piece = pieces.pop(0)
                lps.append(token_logprobs(piece, safe[:, k:k + piece.shape[1]], rollout.temperature,
                                          self.banned.to(piece.device), top_p))
                k += piece.shape[1]
                del piece
            lp = torch.cat(lps, 1)
            parts.append(F.pad(lp.cpu() * mask[:, :t], (0, width - t)))
        if not parts:
            return torch.zeros(0, width)
        return torch.cat(parts)

    @_on_device
    def logprobs(self, rollout: Rollout, rows: slice | None = None, reference: bool = False) -> torch.Tensor:
        """Per-token log-probs of ``rollout.tokens[rows]`` (CPU float32): π_θ with gradient, π_ref without."""
        start, stop, _ = (rows or slice(None)).indices(rollout.tokens.shape[0])
        if reference:
            with torch.no_grad(), self._reference() as ref:
                ref.eval()
                return self._logprobs(ref, rollout, start, stop)
        with self._policy_mode() as model:
            return self._logprobs(model, rollout, start, stop)

    # --- start-up check -------------------------------------------------------------------------------------
    @_on_device
    @torch.no_grad()
    def self_test(self, tokens: int = 4) -> dict:
        """Check the loaded checkpoint the way training uses it: greedy incremental decode of two prompts of
        different lengths with images of different sizes (left-padded together) against the teacher-forced
        log-probs of the same tokens (prompt + caption in one forward, positions computed afresh), with the
        adapter randomised for the test (so its layers take part; restored after); and a non-zero count of LoRA
        layers on the language model. Draws no random numbers.
        ``{"ok", "problem", "lora_targets", "max_abs", "mean_abs", "tokens"}``; fp32 must agree to 1e-5 per token
        (positions off by a constant give ~1e-4 on the tiny builds), bf16/fp16 to 0.1 on average (a bound not yet
        measured on a GPU)."""
        lora = [p for n, p in self.model.named_parameters() if "lora_" in n] if self.lora.enabled else []
        report: dict = {"ok": True, "problem": "", "lora_targets": sum(
            1 for m in self.model.modules() if hasattr(m, "lora_A")) if self.lora.enabled else 0}
        if self.lora.enabled and not report["lora_targets"]:
            return {**report, "ok": False, "problem": "LoRA adapts no layer of the language model"}
        images = [Image.new("RGB", (64, 48), (200, 30, 30)), Image.new("RGB", (40, 120), (30, 30, 200))]
        encs = [self.encode(im, captioner_prompt(q)) for im, q in
                zip(images, ["What is shown?", "What colour is the largest shape in the picture?"])]
        saved = [p.detach().clone() for p in lora]
        g = torch.Generator().manual_seed(0)
        try:
            for p in lora:
                p.copy_((torch.randn(p.shape, generator=g) * 0.02).to(p.dtype))
            self.model.eval()
            tokens, mask, lps = self._generate(self.base_model(), encs, [0, 1], 1.0, tokens, greedy=True)
            roll = Rollout(texts=[[""], [""]], tokens=tokens, mask=mask, logprobs=lps, temperature=1.0,
                           context=HFContext(encs, 1, sampler_logprobs=lps))
            with self._policy_mode() as model:   # the per-row pass: prompt + caption in one forward, no cache
                roll.logprobs = self._logprobs(model, roll, 0, 2, shared=False)
        finally:
            for p, s in zip(lora, saved):
                p.copy_(s)
        mm = self.logprob_mismatch(roll)
        report.update(max_abs=mm["max_abs"], mean_abs=mm["mean_abs"], tokens=mm["tokens"])
        half = next(self.base_model().parameters()).dtype in (torch.bfloat16, torch.float16)
        bad = mm["mean_abs"] > 0.1 if half else mm["max_abs"] > 1e-5
        if bad or not bool(torch.isfinite(roll.logprobs).all()):
            report.update(ok=False, problem=f"incremental decode and teacher-forced log-probs disagree "
                                            f"(max {mm['max_abs']:.3g}, mean {mm['mean_abs']:.3g} over "
                                            f"{mm['tokens']} tokens)")
        return report


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
def _plain_generation_config(model):
    """Hide the checkpoint's ``generation_config.json`` (e.g. Qwen2.5-VL-Instruct's top_k=1, top_p=0.001,
    repetition_penalty=1.05) during ``generate``: HF fills every unset option from it, which would warp the
    logits before the recorder and bias the sampling policy away from softmax(logits / T)."""
    from transformers import GenerationConfig

    saved = model.generation_config
    model.generation_config = GenerationConfig(
        eos_token_id=saved.eos_token_id, pad_token_id=saved.pad_token_id, bos_token_id=saved.bos_token_id)
    try:
        yield
    finally:
        model.generation_config = saved


@contextlib.contextmanager
def _quiet():
    """Silence deprecation notices about library internals (PEFT reads ``is_gradient_checkpointing``)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        yield


@functools.lru_cache(maxsize=1)
def _roomy_layer():
    """A transformers ``DynamicLayer`` whose keys/values are views of a buffer with room for more positions
    (``room_k`` / ``room_v``): ``update`` writes new positions in place while they fit, else concatenates."""
    from transformers.cache_utils import DynamicLayer

    class RoomyLayer(DynamicLayer):
        def update(self, key_states, value_states, *args, **kwargs):
            n, m = self.keys.shape[-2], key_states.shape[-2]
            if n + m > self.room_k.shape[-2]:                      # out of room: the stock concatenation
                return super().update(key_states, value_states, *args, **kwargs)
            self.room_k[..., n:n + m, :] = key_states
            self.room_v[..., n:n + m, :] = value_states
            self.keys, self.values = self.room_k[..., :n + m, :], self.room_v[..., :n + m, :]
            return self.keys, self.values

    return DynamicLayer, RoomyLayer


def _with_room(cache, room: int) -> None:
    """Give each plain layer of a filled KV cache a buffer with ``room`` more positions, in place: decode steps
    then write their keys/values into it and attend over views of the filled part, where the stock layer
    concatenates, i.e. copies the whole cache of every layer at every step (on a CPU, with a prompt of a few
    hundred tokens, that copy was most of a decode step). Same values; layers of other kinds (sliding windows)
    are left as they are."""
    plain, roomy = _roomy_layer()
    layers = getattr(cache, "layers", None) or []
    for i, layer in enumerate(layers):
        if type(layer) is not plain or not layer.is_initialized or layer.keys is None:
            continue
        new = roomy()
        n = layer.keys.shape[-2]
        for name, t in (("room_k", layer.keys), ("room_v", layer.values)):
            buf = t.new_empty(*t.shape[:-2], n + room, t.shape[-1])
            buf[..., :n, :] = t
            setattr(new, name, buf)
        new.keys, new.values = new.room_k[..., :n, :], new.room_v[..., :n, :]
        new.device, new.is_initialized = layer.device, True
        layers[i] = new


def _ban(logits: torch.Tensor, banned: torch.Tensor | None) -> torch.Tensor:
    if banned is not None and banned.numel():
        logits = logits.index_fill(-1, banned.to(logits.device), float("-inf"))
    return logits


def _language_model_prefix(model) -> str:
    """Dotted name of the language model inside a VLM (``model.language_model`` in the supported families)."""
    names = [n for n, _ in model.named_modules() if n.split(".")[-1] == "language_model"]
    if names:
        return min(names, key=len)
    dec = model.get_decoder() if hasattr(model, "get_decoder") else None
    for n, m in model.named_modules():
        if m is dec:
            return n
    return ""


def export_merged(policy_or_path: HFCaptioner | str, out: str, dtype: str | None = None) -> str:
    """Merge a LoRA captioner into its base weights and write a stand-alone checkpoint (model + processor) to
    ``out``, loadable with ``AutoModelForImageTextToText.from_pretrained(out)`` (and by vLLM).

    ``policy_or_path``: a live :class:`HFCaptioner` or a directory written by ``HFCaptioner.save`` (e.g.
    ``RUN/checkpoint/policy``). The merge runs on CPU in fp32; the result is stored in ``dtype`` (``bf16``,
    ``fp16``, ``fp32``; default: the dtype the base checkpoint declares).
    """
    if isinstance(policy_or_path, HFCaptioner):
        with tempfile.TemporaryDirectory() as tmp:
            policy_or_path.save(tmp)
            return export_merged(tmp, out, dtype)
    base, _ = resolve_checkpoint(policy_or_path)
    model = load_merged_model(policy_or_path, HFSettings(device="cpu", dtype="fp32"))
    if dtype is None:
        cfg = _read_json(base, "config.json") or {}
        declared = str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32")
        dtype = {"bfloat16": "bf16", "float16": "fp16"}.get(declared, "fp32")
    model = model.to(_torch_dtype(dtype, "cpu"))
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out)
    load_processor(base).save_pretrained(out)
    return out
