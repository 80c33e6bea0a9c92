"""``make demo``: world -> warm start -> evaluate -> AC-RL -> evaluate -> binary RL -> evaluate -> report.

The default regime trains both reward variants with the same budget from the same warm-started captioner and
writes ``report.md`` with the held-out table and PNG learning curves, and beside it ``report.html`` (the
``acrl report`` page: curves, tables, the episode browser, the clarification patterns; these also go to
``clarification-patterns.md``). ``--full`` adds two harder regimes that the comparison needs (3-fact questions:
sparse successes; a 30%-noisy clarifier).
"""

from __future__ import annotations

import os
import random
import time

from acrl import outdir
from acrl.app.assemble import EVAL_SEED, build_clarifier, build_policy, build_reasoner, captioner_path, make_run
from acrl.app.report import build_report
from acrl.app.report.demo import write_report
from acrl.config import Config, load_config, to_dict
from acrl.eval.evaluate import evaluate, markdown_table, write_results
from acrl.train.loop import train
from acrl.train.warmstart import warm_start
from acrl.world import make_problems
from acrl.world.export import write_dataset

REGIMES = {
    "default": {},
    "sparse-3fact": {"world": {"families": ["bars"], "needed_facts": {3: 1.0}}},
    "noisy-clarifier": {"train": {"clarifier_noise": 0.3}},
}


def _apply(cfg: Config, changes: dict) -> Config:
    """``cfg`` with a regime's section changes, checked like any config."""
    data = to_dict(cfg)
    for section, vals in changes.items():
        data[section] = {**data[section], **vals}
    return load_config(base=data)


def _log(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run_regime(cfg: Config, name: str, out: str, base: str) -> dict:
    """Pretrained, AC-RL and binary-reward evaluations plus training histories for one regime. Each arm is the run
    ``acrl train`` would assemble from the same config (:func:`acrl.app.assemble.make_run`)."""
    os.makedirs(out, exist_ok=True)
    test = make_problems(cfg.eval.split, cfg.eval.n, cfg.world)
    reasoner = build_reasoner(cfg)
    reference = build_policy(cfg, path=base)
    eval_clarifier = build_clarifier(cfg, reference, cfg.train.clarifier_noise, EVAL_SEED)
    result: dict = {"regime": name}
    _log(f"[{name}] evaluating the pretrained captioner on {len(test)} held-out problems")
    summary, items = evaluate(reference, reasoner, eval_clarifier, test, cfg.eval.batch_size, progress=True,
                              desc="eval pretrained", max_clarifications=cfg.train.max_clarifications)
    write_results(os.path.join(out, "eval-pretrained"), summary, items, "pretrained")
    result["pretrained"] = summary
    for arm, alpha in (("acrl", cfg.train.alpha), ("binary", 0.0)):
        acfg = _apply(cfg, {"train": {"alpha": alpha}})
        _log(f"[{name}] training {arm} (alpha={alpha}) for {acfg.train.steps} steps")
        run = make_run(acfg, os.path.join(out, arm), captioner=base)
        hist = train(run)
        _log(f"[{name}] evaluating {arm}")
        summary, items = evaluate(run.policy, reasoner, eval_clarifier, test, cfg.eval.batch_size, progress=True,
                                  desc=f"eval {arm}", max_clarifications=acfg.train.max_clarifications)
        write_results(os.path.join(out, f"eval-{arm}"), summary, items, arm)
        result[arm] = summary
        result[f"{arm}_history"] = hist
    return result


def _summary(r: dict) -> dict:
    """A regime's results without the step histories, plus each arm's training means (the README's table)."""
    out = {k: v for k, v in r.items() if not k.endswith("_history")}
    for arm in ("acrl", "binary"):
        hist = r.get(f"{arm}_history") or []
        vals = {k: [h[k] for h in hist if k in h] for k in ("uniform_frac", "kl_mean")}
        out[f"{arm}_train"] = {k: sum(v) / len(v) if v else None for k, v in vals.items()}
    return out


def run_demo(cfg: Config, out: str, full: bool = False, warmstart: bool = False) -> dict:
    t0 = time.time()
    os.makedirs(out, exist_ok=True)
    _log("generating a sample of the world")
    sample = make_problems("test", 16, cfg.world)
    write_dataset(sample, os.path.join(out, "world"), rng=random.Random(0))
    base = captioner_path(cfg)
    if warmstart or not os.path.isdir(base):
        base = os.path.join(out, "warmstart")
        _log(f"warm start ({cfg.warmstart.steps} steps) -> {base}")
        warm_start(base, cfg.warmstart, cfg.world, cfg.model, log=_log)
    else:
        _log(f"using the shipped warm-started captioner {base}")
    results = []
    for name in (REGIMES if full else ["default"]):
        rcfg = _apply(cfg, REGIMES[name])
        results.append(run_regime(rcfg, name, os.path.join(out, name), base))
    minutes = (time.time() - t0) / 60
    path = write_report(results, out, cfg=to_dict(cfg), minutes=minutes, html="report.html")
    outdir.write_json(os.path.join(out, "results.json"), [_summary(r) for r in results])
    t = cfg.train
    page = build_report([out], out, title=f"acrl demo ({', '.join(r['regime'] for r in results)})",
                        patterns_md=f"`acrl demo` ({'--full' if full else 'default regime'}): {t.steps} steps × "
                                    f"{t.problems_per_step} problems × {t.samples_per_problem} captions per arm; "
                                    f"evaluation on {cfg.eval.n} held-out `{cfg.eval.split}` problems.")
    _log(f"done in {minutes:.1f} min; report: {path}; page: {page}")
    for r in results:
        for arm in ("pretrained", "acrl", "binary"):
            print(markdown_table(r[arm], f"{r['regime']}: {arm}"))
    return {"results": results, "report": path, "page": page}
