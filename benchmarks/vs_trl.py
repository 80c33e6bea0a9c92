"""acrl's trainer against TRL's GRPOTrainer on the same AC-RL job, in one process: steady-state episodes per second.

    python benchmarks/vs_trl.py [--steps 6] [--problems 16] [--samples 8] [--max-new-tokens 32] [--threads 2]
    python benchmarks/vs_trl.py --size 5M --image-size 448 --merge-into benchmarks/results/vs_trl_scaling.json
    python benchmarks/vs_trl.py --grid          # the scaling grid (SIZES x caps), resumable; then the plot
    python benchmarks/vs_trl.py --plot          # only the plot of benchmarks/results/vs_trl_scaling.json

Both sides train the same random Qwen2-VL (``make_tiny('qwen2-vl')``, loaded from the same files) on the same
world problems in the same order, with the same group size M, problems per step B, caption length cap, LoRA
(r, alpha, the same target layers), learning rate (constant), KL weight, clip range, loss aggregation
(sequence mean of token means: acrl ``seq-mean-token-mean`` = TRL ``loss_type="grpo"``), advantages (group
mean/std: acrl ``grpo`` = TRL ``scale_rewards="group"``), micro-batch (acrl ``train.micro_batch`` = TRL
``per_device_train_batch_size``; TRL accumulates ``B*M / micro`` micro-batches into one optimizer step) and the same
AC-RL reward: the world reasoner, with π_ref = the policy's adapter-disabled weights answering clarifications
(acrl: ``HFCaptioner.answer``; TRL: :func:`acrl.integrations.trl.adapter_disabled_clarifier` over the trainer's
PEFT model, same settings). Neither side runs an extra forward for the old log-probs (acrl records them while
sampling; TRL skips them when generation and optimisation steps are aligned).

The first ``--warmup`` steps of each side are excluded. Per-phase seconds: acrl from its step records plus a timer
on ``policy.logprobs(reference=True)``; TRL from timers on its ``_generate``, ``_calculate_rewards`` (reasoner and
clarifier timed inside) and the no-grad ``_get_per_token_logps_and_entropies`` calls (reference forward).

Model sizes (``--size``, :data:`SIZES`): the same Qwen2-VL architecture at three widths/depths (0.2M: the tiny
checkpoint; 5M; 35M), all with the tiny 400-token tokenizer; ``--image-size`` is the side the processor resizes every
image to (448: 256 image tokens, a ~400-token prompt, as Qwen2.5-VL with a ``max_pixels`` bound gives for a small
chart). Besides each phase, every side's model work is clocked: seconds inside the HF model's ``forward`` (split into
calls that carry ``pixel_values``: prompt prefills, and the rest) and inside autograd's ``backward``. Generation is
split into its prefill (the forwards with the image) and its decode (the rest of the generation phase: per-token
forwards plus sampling); ``model_compute_fraction`` is the model's seconds over the step's.

Writes ``benchmarks/results/vs_trl.json``; with ``--merge-into FILE`` the cell is merged into FILE's ``cells``
instead (key ``size/cap/order``), which is what ``--grid`` does, one subprocess per cell, skipping cells already
there. ``--profile`` additionally runs cProfile over the measured steps (slower; write it elsewhere with ``--out``).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import functools
import io
import json
import os
import platform
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
LORA_REGEX = r".*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
SCALING = os.path.join(HERE, "results", "vs_trl_scaling.json")
# the same Qwen2-VL architecture at three sizes (text and vision dims of acrl.backends.hf.tiny.build); the MLP
# width is ~5.4x hidden and heads are 64 wide above the tiny size, as in Qwen2-VL-2B / Qwen2.5-VL-3B
SIZES = {
    "0.2M": {},
    "5M": {"text": {"hidden": 256, "layers": 4, "heads": 4, "kv_heads": 2, "intermediate": 1376},
           "vision": {"depth": 2, "embed_dim": 64, "num_heads": 2}},
    "35M": {"text": {"hidden": 512, "layers": 7, "heads": 8, "kv_heads": 2, "intermediate": 2752},
            "vision": {"depth": 4, "embed_dim": 128, "num_heads": 4}},
}
# the scaling grid: (size, caption cap, order, measured steps); 1 warmup step each, 4 problems x 8 captions
# (the 35M cells' TRL steps take 2-3 minutes on one core: B = 4 keeps a cell near 10 minutes)
GRID = [("0.2M", 32, "acrl,trl", 5), ("0.2M", 128, "acrl,trl", 5), ("5M", 32, "acrl,trl", 4),
        ("5M", 128, "acrl,trl", 4), ("5M", 128, "trl,acrl", 4), ("35M", 32, "acrl,trl", 3),
        ("35M", 128, "acrl,trl", 3), ("5M", 512, "acrl,trl", 3)]   # the last: captions as long as real ones
GRID_ARGS = ["--image-size", "448", "--problems", "4", "--samples", "8", "--micro-batch", "16", "--threads", "1",
             "--warmup", "1"]


class Timer:
    """Accumulates seconds of wrapped calls, per step."""

    def __init__(self):
        self.total = 0.0

    def wrap(self, fn, when=None):
        def inner(*a, **kw):
            if when is not None and not when(*a, **kw):
                return fn(*a, **kw)
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.total += time.perf_counter() - t
        return inner

    def take(self) -> float:
        v, self.total = self.total, 0.0
        return v


class ModelClock:
    """Seconds of model work, cumulative; :meth:`snap` reads them. ``prefill``: HF ``forward`` calls over more than
    one new token or with the image (prompt prefills, teacher-forced passes) and the vision tower where it runs
    outside ``forward`` (transformers' ``generate`` encodes images first); ``decode``: one-token ``forward`` calls;
    ``backward``: ``torch.autograd.backward``. Nested calls count once (the outermost). One side at a time."""

    def __init__(self):
        self.s = {"prefill": 0.0, "decode": 0.0, "backward": 0.0}
        self._depth = 0
        self._undo: list = []

    def _wrap(self, owner, name: str, kind) -> None:
        fn = getattr(owner, name)

        @functools.wraps(fn)            # generate() validates its kwargs against forward's signature
        def inner(*a, **kw):
            if self._depth:
                return fn(*a, **kw)
            self._depth += 1
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self._depth -= 1
                self.s[kind(a, kw)] += time.perf_counter() - t

        setattr(owner, name, inner)
        self._undo.append((owner, name, fn))

    @staticmethod
    def _forward_kind(a, kw) -> str:
        ids = kw.get("input_ids", a[0] if a else None)
        emb = kw.get("inputs_embeds")
        n = ids.shape[-1] if ids is not None else (emb.shape[1] if emb is not None else 2)
        return "prefill" if kw.get("pixel_values") is not None or n > 1 else "decode"

    def install(self, model) -> None:
        self._wrap(model, "forward", self._forward_kind)
        self._wrap(model.model, "get_image_features", lambda a, kw: "prefill")
        self._wrap(torch.autograd, "backward", lambda a, kw: "backward")

    def uninstall(self) -> None:
        while self._undo:
            owner, name, fn = self._undo.pop()
            if owner is torch.autograd:
                torch.autograd.backward = fn
            else:
                delattr(owner, name)   # the instance attribute; the class method shows through again

    def snap(self) -> dict:
        return dict(self.s)


def delta(a: dict, b: dict) -> dict:
    return {k: b[k] - a[k] for k in a}


def model_phases(steps: list[dict], gen: list[dict], step_seconds: list[float], generation: list[float]) -> dict:
    """Per-step model seconds (``steps``: clock deltas per step; ``gen``: clock deltas of each step's generation
    phase) -> generation prefill / decode split and the model-compute fraction of the step."""
    prefill = [g["prefill"] for g in gen]
    model = [sum(d.values()) for d in steps]
    return {"generation_prefill": mean(prefill),
            "generation_decode": mean([g - p for g, p in zip(generation, prefill)]),
            "generation_decode_model_forward": mean([g["decode"] for g in gen]),
            "model_forward_seconds": mean([d["prefill"] + d["decode"] for d in steps]),
            "model_backward_seconds": mean([d["backward"] for d in steps]),
            "model_compute_fraction": round(sum(model) / sum(step_seconds), 4) if step_seconds else None}


class TimedReasoner:
    def __init__(self, inner, timer: Timer):
        self.inner, self.complete = inner, timer.wrap(inner.complete)


class TimedClarifier:
    def __init__(self, inner, timer: Timer):
        self.inner, self.answer = inner, timer.wrap(inner.answer)


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor()


def mean(xs):
    return round(statistics.fmean(xs), 4) if xs else None


def profile_top(prof: cProfile.Profile, n: int = 25) -> list[str]:
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(n)
    return [ln.rstrip() for ln in s.getvalue().splitlines() if ln.strip()][-(n + 1):]


# --- acrl ---------------------------------------------------------------------------------------------------------

def run_acrl(args, model_dir: str, work: str) -> dict:
    from acrl.app.assemble import build_policy, world_source
    from acrl.config import load_config
    from acrl.train.loop import Run, train

    steps = args.warmup + args.steps
    cfg = load_config(os.path.join(ROOT, "configs", "qwen2-vl-tiny.yaml"), [
        f"captioner.path={model_dir}", f"captioner.max_new_tokens={args.max_new_tokens}",
        f"captioner.answer_max_new_tokens={args.answer_max_new_tokens}",
        f"captioner.lora.r={args.lora_r}", f"captioner.lora.alpha={args.lora_alpha}",
        f"train.steps={steps}", f"train.problems_per_step={args.problems}",
        f"train.samples_per_problem={args.samples}", f"train.lr={args.lr}", f"train.kl_beta={args.beta}",
        "train.advantage=grpo", "train.aggregation=seq-mean-token-mean", "train.warmup=0",
        f"train.micro_batch={args.micro_batch}", f"train.checkpoint_every={steps + 1}", "train.eval_every=0",
        f"train.threads={args.threads}", "train.log_episodes=0", "train.seed=0"])
    policy = build_policy(cfg)
    torch.set_num_threads(args.threads)
    ref_timer = Timer()
    policy.logprobs = ref_timer.wrap(policy.logprobs, when=lambda *a, **kw: kw.get("reference", False))
    clock = ModelClock()
    clock.install(policy.base_model())
    gen_clock: list[dict] = []
    generate = policy.generate

    def timed_generate(*a, **kw):
        c0 = clock.snap()
        try:
            return generate(*a, **kw)
        finally:
            gen_clock.append(delta(c0, clock.snap()))

    policy.generate = timed_generate
    ref_per_step: list[float] = []
    step_clock: list[dict] = []
    last = [clock.snap()]
    problems = world_source(cfg)

    def source(start, n):                      # called once per step, before the step's work
        if start:
            ref_per_step.append(ref_timer.take())
            now = clock.snap()
            step_clock.append(delta(last[0], now))
            last[0] = now
        return problems(start, n)

    prof = cProfile.Profile() if args.profile else None
    t0 = time.perf_counter()
    try:
        with (prof or contextlib.nullcontext()):
            hist = train(Run(cfg, os.path.join(work, "acrl"), policy, policy_reasoner(), policy, source),
                             progress=False)
    finally:
        clock.uninstall()
    wall = time.perf_counter() - t0
    ref_per_step.append(ref_timer.take())
    step_clock.append(delta(last[0], clock.snap()))   # the last step (and the final checkpoint: no model work)
    steady = hist[args.warmup:]
    ref = ref_per_step[args.warmup:]
    step = [h["time_step"] for h in steady]
    upd = [h.get("time_update", 0.0) for h in steady]
    out = {
        "seconds_per_step": mean(step),
        "step_seconds": [round(s, 3) for s in step],
        "seconds_per_phase": {
            "generation": mean([h["time_generation"] for h in steady]),
            "reasoner": mean([h["time_reasoner"] for h in steady]),
            "clarification": mean([h["time_clarification"] for h in steady]),
            "reference_forward": mean(ref),
            # π_ref's pass runs in the rollout (overlapping the episodes), so the update is the policy's alone;
            # the trainer computes π_ref's log-probs inside update() only when the rollout did not
            "policy_forward_backward_step": mean([u - (r if not h.get("time_reference") else 0.0)
                                                  for u, r, h in zip(upd, ref, steady)]),
        },
        "mean_completion_tokens": mean([h["caption_tokens"] for h in steady]),
        "clarification_rate": mean([h["clarification_rate"] for h in steady]),
        "reward": mean([h["reward"] for h in steady]),
        "kl_mean_last": float(f"{steady[-1].get('kl_mean', 0.0):.3g}") if steady else None,
        "wall_seconds_total": round(wall, 1),
    }
    out["seconds_per_phase"]["other"] = round(out["seconds_per_step"] - sum(out["seconds_per_phase"].values()), 4)
    out["model"] = model_phases(step_clock[args.warmup:], gen_clock[args.warmup:], step,
                                [h["time_generation"] for h in steady])
    if prof:
        out["profile_tottime"] = profile_top(prof)
    return out


def policy_reasoner():
    from acrl.world.reasoner import WorldReasoner

    return WorldReasoner(read_budget=6)


# --- TRL ----------------------------------------------------------------------------------------------------------

def run_trl(args, model_dir: str, work: str) -> dict:
    from peft import LoraConfig
    from transformers import PrinterCallback, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from acrl.backends.hf.loading import load_model, load_processor, lora_target_modules
    from acrl.config import HFSettings, load_config
    from acrl.integrations.trl import adapter_disabled_clarifier, make_acrl_reward, world_dataset
    from acrl.world import make_problems

    steps = args.warmup + args.steps
    wcfg = load_config(os.path.join(ROOT, "configs", "qwen2-vl-tiny.yaml")).world
    settings = HFSettings(device="cpu", dtype="fp32", attn_implementation="sdpa",
                          answer_max_new_tokens=args.answer_max_new_tokens)
    model = load_model(model_dir, settings)
    proc = load_processor(model_dir)
    proc.tokenizer.padding_side = "left"      # TRL left-pads prompt ids; the processor's per-token fields must match
    targets = lora_target_modules(model, LORA_REGEX, freeze_vision=True)
    ds = world_dataset(0, problems=make_problems("train", args.problems * steps, wcfg))
    t_reasoner, t_clar, t_gen, t_reward, t_ref, t_score = (Timer() for _ in range(6))
    reward = make_acrl_reward(TimedReasoner(policy_reasoner(), t_reasoner), None, alpha=0.7)
    micro = args.micro_batch
    if (args.problems * args.samples) % micro:
        raise SystemExit(f"--micro-batch {micro} must divide problems x samples = {args.problems * args.samples}")
    cfg = GRPOConfig(
        output_dir=os.path.join(work, "trl"), use_cpu=True, bf16=False, fp16=False, activation_checkpointing=False,
        use_vllm=False, num_generations=args.samples, per_device_train_batch_size=micro,
        gradient_accumulation_steps=args.problems * args.samples // micro, max_completion_length=args.max_new_tokens,
        max_steps=steps, learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, beta=args.beta, loss_type="grpo", scale_rewards="group", epsilon=0.2, num_iterations=1,
        temperature=1.0, top_p=1.0, top_k=0, report_to="none", save_strategy="no", logging_steps=1,
        dataloader_num_workers=0, shuffle_dataset=False, seed=0, disable_tqdm=True, log_completions=False)
    trainer = GRPOTrainer(model=model, reward_funcs=[reward], args=cfg, train_dataset=ds, processing_class=proc,
                          peft_config=LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0,
                                                 target_modules=targets))
    reward.clarifier = TimedClarifier(adapter_disabled_clarifier(trainer.model, proc, settings), t_clar)
    torch.set_num_threads(args.threads)
    clock = ModelClock()
    clock.install(trainer.model.get_base_model())
    gen_clock: list[dict] = []
    generate = trainer._generate

    def timed_generate(*a, **kw):
        c0 = clock.snap()
        try:
            return generate(*a, **kw)
        finally:
            gen_clock.append(delta(c0, clock.snap()))

    trainer._generate = t_gen.wrap(timed_generate)
    trainer._calculate_rewards = t_reward.wrap(trainer._calculate_rewards)
    trainer._get_per_token_logps_and_entropies = t_ref.wrap(trainer._get_per_token_logps_and_entropies,
                                                            when=lambda *a, **kw: not torch.is_grad_enabled())
    trainer._generate_and_score_completions = t_score.wrap(trainer._generate_and_score_completions)
    rows: list[dict] = []

    class StepClock(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            self.t, self.c = time.perf_counter(), clock.snap()

        def on_step_end(self, a, state, control, **kw):
            rows.append({"time_step": time.perf_counter() - self.t, "clock": delta(self.c, clock.snap()),
                         "generation": t_gen.take(),
                         "reasoner": t_reasoner.take(), "clarification": t_clar.take(), "reward": t_reward.take(),
                         "reference_forward": t_ref.take(), "score": t_score.take(),
                         "threads": torch.get_num_threads()})

    trainer.add_callback(StepClock())
    trainer.remove_callback(PrinterCallback)     # the per-step log dicts; they stay in trainer.state.log_history
    prof = cProfile.Profile() if args.profile else None
    t0 = time.perf_counter()
    try:
        with (prof or contextlib.nullcontext()):
            trainer.train()
    finally:
        clock.uninstall()
    wall = time.perf_counter() - t0
    logs = [h for h in trainer.state.log_history if "completions/mean_length" in h]
    steady, steady_logs = rows[args.warmup:], logs[args.warmup:]
    phases = {
        "generation": mean([r["generation"] for r in steady]),
        "reasoner": mean([r["reasoner"] for r in steady]),
        "clarification": mean([r["clarification"] for r in steady]),
        "reference_forward": mean([r["reference_forward"] for r in steady]),
        "policy_forward_backward_step": mean([r["time_step"] - r["score"] for r in steady]),
    }
    out = {
        "seconds_per_step": mean([r["time_step"] for r in steady]),
        "step_seconds": [round(r["time_step"], 3) for r in steady],
        "seconds_per_phase": phases,
        "mean_completion_tokens": mean([h["completions/mean_length"] for h in steady_logs]),
        "clipped_ratio": mean([h["completions/clipped_ratio"] for h in steady_logs]),
        "clarification_rate": mean([h.get("acrl/clarification_rate", float("nan")) for h in steady_logs]),
        "reward": mean([h["reward"] for h in steady_logs]),
        "kl_last": float(f"{steady_logs[-1].get('kl', 0.0):.3g}") if steady_logs else None,
        "threads_seen": sorted({r["threads"] for r in rows}),
        "wall_seconds_total": round(wall, 1),
    }
    phases["other"] = round(out["seconds_per_step"] - sum(v for v in phases.values() if v is not None), 4)
    if len(gen_clock) != len(rows):
        raise SystemExit(f"TRL generated {len(gen_clock)} times in {len(rows)} steps; expected once per step")
    out["model"] = model_phases([r["clock"] for r in steady], gen_clock[args.warmup:],
                                [r["time_step"] for r in steady], [r["generation"] for r in steady])
    if prof:
        out["profile_tottime"] = profile_top(prof)
    return out


def prompt_tokens(model_dir: str, problems) -> float:
    """Mean prompt length (image tokens + chat template + captioner prompt) of ``problems`` under the checkpoint's
    processor, as both sides encode it."""
    from acrl.backends.hf.loading import load_processor
    from acrl.rollout.prompts import captioner_prompt

    proc = load_processor(model_dir)
    lens = []
    for p in problems:
        question = {"type": "text", "text": captioner_prompt(p.question_with_choices())}
        msgs = [{"role": "user", "content": [{"type": "image"}, question]}]
        text = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        lens.append(proc(text=[text], images=[p.image.convert("RGB")], return_tensors="pt")["input_ids"].shape[1])
    return round(statistics.fmean(lens), 1)


def run_cell(args) -> dict:
    """Both sides on one (size, image size, cap) in this process, in ``args.order``."""
    from acrl.backends.hf.tiny import make_tiny
    from acrl.config import load_config
    from acrl.world import make_problems

    if args.size not in SIZES:
        raise SystemExit(f"--size {args.size!r}: one of {', '.join(SIZES)}")
    order = args.order.split(",")
    if sorted(order) != ["acrl", "trl"]:
        raise SystemExit(f"--order {args.order!r}: acrl,trl or trl,acrl")
    result: dict = {
        "what": "acrl.train.loop.train (hf backend) vs trl.GRPOTrainer on the same AC-RL job (random Qwen2-VL, "
                "world reasoner, π_ref = adapter-disabled policy), steady-state",
        "settings": {"size": args.size, "image_size": args.image_size, "problems_per_step": args.problems,
                     "samples_per_problem": args.samples, "episodes_per_step": args.problems * args.samples,
                     "max_new_tokens": args.max_new_tokens, "answer_max_new_tokens": args.answer_max_new_tokens,
                     "micro_batch": args.micro_batch, "lr": args.lr, "kl_beta": args.beta, "lora_r": args.lora_r,
                     "lora_alpha": args.lora_alpha, "loss": "seq-mean-token-mean == TRL loss_type=grpo",
                     "advantage": "group mean/std", "warmup_steps_excluded": args.warmup,
                     "measured_steps": args.steps, "threads": args.threads, "order": args.order,
                     "profiled": args.profile},
    }
    eps = args.problems * args.samples
    with tempfile.TemporaryDirectory() as work:
        t = time.perf_counter()
        model_dir = make_tiny("qwen2-vl", os.path.join(work, "model"), seed=0, image_size=args.image_size,
                              **SIZES[args.size])
        with open(os.path.join(model_dir, "acrl_tiny.json")) as fh:
            meta = json.load(fh)
        result["settings"]["model_parameters"] = meta["parameters"]
        result["settings"]["model_dims"] = {"text": meta["text"], "vision": meta["vision"]}
        wcfg = load_config(os.path.join(ROOT, "configs", "qwen2-vl-tiny.yaml")).world
        result["settings"]["prompt_tokens_mean"] = prompt_tokens(model_dir, make_problems("train", args.problems,
                                                                                          wcfg))
        print(f"cell {args.size} image {args.image_size} cap {args.max_new_tokens}: "
              f"{meta['parameters']:,} parameters, prompt {result['settings']['prompt_tokens_mean']} tokens "
              f"(built in {time.perf_counter() - t:.1f}s)", flush=True)
        for side in order:
            t = time.perf_counter()
            res = (run_acrl if side == "acrl" else run_trl)(args, model_dir, work)
            res["episodes_per_second"] = round(eps / res["seconds_per_step"], 3)
            res["run_seconds"] = round(time.perf_counter() - t, 1)
            result[side] = res
            print(side, json.dumps({k: v for k, v in res.items() if k != "profile_tottime"}), flush=True)
    result["ratio_acrl_over_trl"] = round(result["acrl"]["episodes_per_second"] / result["trl"]["episodes_per_second"],
                                          3)
    result["machine"] = machine()
    return result


def machine() -> dict:
    return {"cpu": cpu_name(), "cpus": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": version("transformers"), "trl": version("trl"), "peft": version("peft"),
            "date": time.strftime("%Y-%m-%d %H:%M")}


def cell_key(size: str, cap: int, order: str) -> str:
    return f"{size}/{cap}/{order}"


def write_json(path: str, data: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=1)
    os.replace(tmp, path)


def merge_cell(path: str, result: dict) -> None:
    """Put one cell into the scaling file's ``cells`` (replacing a cell with the same key)."""
    data: dict = {}
    if os.path.exists(path):
        with open(path) as fh:
            data = json.load(fh)
    data.setdefault("what", "acrl vs TRL over model size x caption cap (benchmarks/vs_trl.py --grid): each cell "
                            "runs both sides in one process on the same job; see each cell's settings")
    data.setdefault("sizes", SIZES)
    st = result["settings"]
    data.setdefault("cells", {})[cell_key(st["size"], st["max_new_tokens"], st["order"])] = result
    data["cells"] = dict(sorted(data["cells"].items(), key=lambda kv: (
        kv[1]["settings"]["model_parameters"], kv[1]["settings"]["max_new_tokens"], kv[1]["settings"]["order"])))
    write_json(path, data)


def run_grid(args) -> None:
    """Each GRID cell in its own subprocess (both sides in it), merged into ``args.merge_into`` as it finishes;
    cells already there are skipped (``--redo`` runs them again). Then the plot."""
    path = args.merge_into or SCALING
    for size, cap, order, steps in GRID:
        done = {}
        if os.path.exists(path):
            with open(path) as fh:
                done = json.load(fh).get("cells", {})
        if cell_key(size, cap, order) in done and not args.redo:
            print(f"skip {cell_key(size, cap, order)} (in {path})", flush=True)
            continue
        cmd = [sys.executable, os.path.abspath(__file__), "--size", size, "--max-new-tokens", str(cap), "--order",
               order, "--steps", str(steps), "--merge-into", path, *GRID_ARGS]
        print("$", " ".join(cmd[1:]), flush=True)
        t = time.perf_counter()
        rc = subprocess.run(cmd).returncode
        if rc:
            raise SystemExit(f"cell {cell_key(size, cap, order)} failed (exit {rc})")
        print(f"cell {cell_key(size, cap, order)} done in {time.perf_counter() - t:.0f}s", flush=True)
        plot(path)


PHASES = ("generation_prefill", "generation_decode", "reference_forward", "policy_forward_backward_step",
          "reasoner", "clarification", "other")


def phase_seconds(side: dict) -> dict:
    """The side's step split into PHASES (generation split into prefill and decode)."""
    ph, m = side["seconds_per_phase"], side["model"]
    out = {"generation_prefill": m["generation_prefill"], "generation_decode": m["generation_decode"]}
    out.update({k: ph[k] for k in PHASES if k in ph})
    return out


def plot(path: str) -> str:
    """benchmarks/results/vs_trl_scaling.png from the scaling file: the ratio per cell, and each side's step split
    into phases."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(path) as fh:
        cells = json.load(fh)["cells"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(17, 5.6), gridspec_kw={"width_ratios": [1, 2]})
    caps = sorted({c["settings"]["max_new_tokens"] for c in cells.values()})
    for cap, marker in zip(caps, "os^Dv"):
        pts = sorted((c["settings"]["model_parameters"], c["ratio_acrl_over_trl"], c["settings"]["order"])
                     for c in cells.values() if c["settings"]["max_new_tokens"] == cap)
        main_pts = [(n, r) for n, r, o in pts if o == "acrl,trl"]
        if main_pts:
            ax1.plot(*zip(*main_pts), marker=marker, label=f"caption cap {cap}")
        rev = [(n, r) for n, r, o in pts if o != "acrl,trl"]
        if rev:
            ax1.scatter(*zip(*rev), marker=marker, facecolors="none", edgecolors="k", zorder=3,
                        label=f"cap {cap}, TRL run first")
    ax1.axhline(2.0, color="grey", ls="--", lw=1)
    ax1.set_xscale("log")
    sizes = sorted({(c["settings"]["model_parameters"], c["settings"]["size"]) for c in cells.values()})
    ax1.set_xticks([n for n, _ in sizes], [f"{name}\n{n:,}" for n, name in sizes], fontsize=8)
    ax1.minorticks_off()
    ax1.set_ylim(bottom=0)
    ax1.set_xlabel("model parameters")
    ax1.set_ylabel("acrl / TRL episodes per second")
    ax1.set_title("acrl vs TRL GRPOTrainer, same AC-RL job (CPU, 1 thread)", fontsize=10)
    ax1.legend(fontsize=8)
    labels, colors = [], plt.get_cmap("tab10").colors
    x, ticks = 0.0, []
    for key, c in cells.items():
        for side in ("acrl", "trl"):
            sec, step = phase_seconds(c[side]), c[side]["seconds_per_step"]
            bottom = 0.0
            for i, k in enumerate(PHASES):
                v = max(0.0, sec.get(k) or 0.0) / step
                ax2.bar(x, v, bottom=bottom, color=colors[i], label=k if not ticks else None, width=0.8)
                bottom += v
            ax2.text(x, min(bottom, 1.02) + 0.01, f"{step:.3g}s", ha="center", fontsize=6)
            ax2.plot([x - 0.4, x + 0.4], [c[side]["model"]["model_compute_fraction"]] * 2, color="k", lw=1.5,
                     label="model compute share" if not ticks else None)
            labels.append(f"{side}\n{key.rsplit('/', 1)[0]}" + ("*" if c["settings"]["order"] != "acrl,trl" else ""))
            ticks.append(x)
            x += 1
        x += 0.5
    ax2.set_xticks(ticks, labels, fontsize=6.5)
    ax2.set_ylim(0, 1.12)
    ax2.set_ylabel("share of the step (seconds per step on top)")
    ax2.set_title("step by phase, per side and cell (size/cap; * TRL ran first)", fontsize=10)
    ax2.legend(fontsize=7, ncol=4, loc="lower center", bbox_to_anchor=(0.5, -0.32))
    fig.tight_layout()
    out = os.path.splitext(path)[0] + ".png"
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=6, help="measured steps per side")
    ap.add_argument("--warmup", type=int, default=1, help="excluded first steps per side")
    ap.add_argument("--problems", type=int, default=16, help="problems per step (B)")
    ap.add_argument("--samples", type=int, default=8, help="captions per problem (M)")
    ap.add_argument("--max-new-tokens", type=int, default=32, help="caption length cap")
    ap.add_argument("--answer-max-new-tokens", type=int, default=24, help="π_ref answer length cap")
    ap.add_argument("--micro-batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--beta", type=float, default=0.02, help="KL weight (both sides)")
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--lora-alpha", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--order", default="acrl,trl", help="which side runs first")
    ap.add_argument("--size", default="0.2M", help=f"model size: {', '.join(SIZES)}")
    ap.add_argument("--image-size", type=int, default=56, help="processor image side (px, multiple of 28)")
    ap.add_argument("--profile", action="store_true", help="cProfile both sides (distorts the timings)")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "vs_trl.json"))
    ap.add_argument("--merge-into", default="", help="merge the cell into this scaling file instead of --out")
    ap.add_argument("--grid", action="store_true", help="run the scaling grid (GRID), one subprocess per cell")
    ap.add_argument("--redo", action="store_true", help="with --grid: rerun cells already in the file")
    ap.add_argument("--plot", action="store_true", help="only plot the scaling file (--merge-into or default)")
    args = ap.parse_args()
    if args.plot:
        print(plot(args.merge_into or SCALING))
        return
    if args.grid:
        run_grid(args)
        return
    torch.set_num_threads(args.threads)
    result = run_cell(args)
    if args.merge_into:
        merge_cell(args.merge_into, result)
    else:
        write_json(args.out, result)
    print(json.dumps({k: result[k] for k in ("ratio_acrl_over_trl", "machine")}, indent=1))


if __name__ == "__main__":
    main()
