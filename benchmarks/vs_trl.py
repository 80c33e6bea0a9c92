"""acrl's trainer against TRL's GRPOTrainer on the same AC-RL job, in one process: steady-state episodes per second.

    python benchmarks/vs_trl.py [--steps 6] [--problems 16] [--samples 8] [--max-new-tokens 32] [--threads 2]

Both sides train the same tiny random Qwen2-VL (``make_tiny('qwen2-vl')``, loaded from the same files) on the same
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

Writes ``benchmarks/results/vs_trl.json``. ``--profile`` additionally runs cProfile over the measured steps (slower;
write it elsewhere with ``--out``).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import os
import platform
import pstats
import statistics
import tempfile
import time
from importlib.metadata import version

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
LORA_REGEX = r".*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


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
    from acrl.build import build_policy, world_source
    from acrl.config import load_config
    from acrl.trainer import train

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
    ref_per_step: list[float] = []
    problems = world_source(cfg)

    def source(start, n):                      # called once per step, before the step's work
        if start:
            ref_per_step.append(ref_timer.take())
        return problems(start, n)

    prof = cProfile.Profile() if args.profile else None
    t0 = time.perf_counter()
    with (prof or contextlib.nullcontext()):
        hist = train(cfg, policy, policy_reasoner(), policy, source, os.path.join(work, "acrl"), progress=False)
    wall = time.perf_counter() - t0
    ref_per_step.append(ref_timer.take())
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
            "policy_forward_backward_step": mean([u - r for u, r in zip(upd, ref)]),
        },
        "mean_completion_tokens": mean([h["caption_tokens"] for h in steady]),
        "clarification_rate": mean([h["clarification_rate"] for h in steady]),
        "reward": mean([h["reward"] for h in steady]),
        "kl_mean_last": float(f"{steady[-1].get('kl_mean', 0.0):.3g}") if steady else None,
        "wall_seconds_total": round(wall, 1),
    }
    out["seconds_per_phase"]["other"] = round(out["seconds_per_step"] - sum(out["seconds_per_phase"].values()), 4)
    if prof:
        out["profile_tottime"] = profile_top(prof)
    return out


def policy_reasoner():
    from acrl.backends.world import WorldReasoner

    return WorldReasoner(read_budget=6)


# --- TRL ----------------------------------------------------------------------------------------------------------

def run_trl(args, model_dir: str, work: str) -> dict:
    from peft import LoraConfig
    from transformers import PrinterCallback, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from acrl.backends.hf import HFCaptioner, HFSettings, load_model, load_processor
    from acrl.config import load_config
    from acrl.integrations.trl import adapter_disabled_clarifier, make_acrl_reward, world_dataset
    from acrl.world import make_problems

    steps = args.warmup + args.steps
    wcfg = load_config(os.path.join(ROOT, "configs", "qwen2-vl-tiny.yaml")).world
    settings = HFSettings(device="cpu", dtype="fp32", attn_implementation="sdpa",
                          answer_max_new_tokens=args.answer_max_new_tokens)
    model = load_model(model_dir, settings)
    proc = load_processor(model_dir)
    proc.tokenizer.padding_side = "left"      # TRL left-pads prompt ids; the processor's per-token fields must match
    targets = HFCaptioner.lora_target_modules(model, LORA_REGEX, freeze_vision=True)
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
    trainer._generate = t_gen.wrap(trainer._generate)
    trainer._calculate_rewards = t_reward.wrap(trainer._calculate_rewards)
    trainer._get_per_token_logps_and_entropies = t_ref.wrap(trainer._get_per_token_logps_and_entropies,
                                                            when=lambda *a, **kw: not torch.is_grad_enabled())
    trainer._generate_and_score_completions = t_score.wrap(trainer._generate_and_score_completions)
    rows: list[dict] = []

    class StepClock(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            rows.append({"time_step": time.perf_counter() - self.t, "generation": t_gen.take(),
                         "reasoner": t_reasoner.take(), "clarification": t_clar.take(), "reward": t_reward.take(),
                         "reference_forward": t_ref.take(), "score": t_score.take(),
                         "threads": torch.get_num_threads()})

    trainer.add_callback(StepClock())
    trainer.remove_callback(PrinterCallback)     # the per-step log dicts; they stay in trainer.state.log_history
    prof = cProfile.Profile() if args.profile else None
    t0 = time.perf_counter()
    with (prof or contextlib.nullcontext()):
        trainer.train()
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
    if prof:
        out["profile_tottime"] = profile_top(prof)
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
    ap.add_argument("--profile", action="store_true", help="cProfile both sides (distorts the timings)")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "vs_trl.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from acrl.backends.hf_tiny import make_tiny

    result: dict = {
        "what": "acrl.trainer.train (hf backend) vs trl.GRPOTrainer on the same AC-RL job (tiny random Qwen2-VL, "
                "world reasoner, π_ref = adapter-disabled policy), steady-state",
        "settings": {"problems_per_step": args.problems, "samples_per_problem": args.samples,
                     "episodes_per_step": args.problems * args.samples, "max_new_tokens": args.max_new_tokens,
                     "answer_max_new_tokens": args.answer_max_new_tokens, "micro_batch": args.micro_batch,
                     "lr": args.lr, "kl_beta": args.beta, "lora_r": args.lora_r, "lora_alpha": args.lora_alpha,
                     "loss": "seq-mean-token-mean == TRL loss_type=grpo", "advantage": "group mean/std",
                     "warmup_steps_excluded": args.warmup, "measured_steps": args.steps, "threads": args.threads,
                     "order": args.order, "profiled": args.profile},
    }
    eps = args.problems * args.samples
    with tempfile.TemporaryDirectory() as work:
        model_dir = make_tiny("qwen2-vl", os.path.join(work, "model"), seed=0)
        with open(os.path.join(model_dir, "acrl_tiny.json")) as fh:
            result["settings"]["model_parameters"] = json.load(fh)["parameters"]
        for side in args.order.split(","):
            t = time.perf_counter()
            res = (run_acrl if side == "acrl" else run_trl)(args, model_dir, work)
            res["episodes_per_second"] = round(eps / res["seconds_per_step"], 2)
            res["run_seconds"] = round(time.perf_counter() - t, 1)
            result[side] = res
            print(side, json.dumps({k: v for k, v in res.items() if k != "profile_tottime"}), flush=True)
    result["ratio_acrl_over_trl"] = round(result["acrl"]["episodes_per_second"] / result["trl"]["episodes_per_second"],
                                          3)
    result["machine"] = {"cpu": cpu_name(), "cpus": os.cpu_count(), "platform": platform.platform(),
                         "python": platform.python_version(), "torch": torch.__version__,
                         "transformers": version("transformers"), "trl": version("trl"), "peft": version("peft"),
                         "date": time.strftime("%Y-%m-%d %H:%M")}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)
    print(json.dumps({k: result[k] for k in ("ratio_acrl_over_trl", "machine")}, indent=1))


if __name__ == "__main__":
    main()
