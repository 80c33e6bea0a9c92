"""Build the one-file HTML report: learning curves, evaluation tables, the episode browser and clarification patterns.

The page is rendered with Jinja2 from ``acrl/templates/report.html.j2``; plots are drawn by Plotly, whose
JavaScript (from the ``plotly`` package) is inlined, and images are ``data:`` URIs, so the file opens from disk with
no server and no network.
"""

from __future__ import annotations

import json
import math
import os
import time

from acrl import outdir
from acrl.app.report import patterns
from acrl.app.report import runs as rr
from acrl.app.report.runs import Run, clean
from acrl.data import load_benchmark
from acrl.world import WorldConfig

CURVES = [
    ("reward", "sampled reward"),
    ("direct_correct", "single-pass success (correct without asking)"),
    ("clarification_rate", "clarification rate"),
    ("uniform_frac", "uniform-reward groups"),
    ("kl_mean", "KL to π_ref"),
    ("caption_words", "caption length (words)"),
    ("eval.accuracy", "held-out single-pass accuracy"),
    ("eval.clarification_rate", "held-out clarification rate"),
]
PHASES = ("generation", "reference", "episodes", "reasoner", "clarification", "update", "step")
OVERALL = [("n", "n"), ("accuracy", "single-pass acc %"), ("clarification_rate", "clar. rate %"),
           ("accuracy_with_clarification", "acc. with clar. %"), ("clarification_gap", "gap (pts)"),
           ("acc_deny", "Acc_deny %"), ("caption_words", "caption words")]
TIERS = ("direct_correct", "clarified_correct", "wrong", "failed")


def _num(x) -> float | None:
    return x if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def _cell(key: str, v, base=None) -> dict:
    """A table cell: the formatted value and, against a baseline value, the signed difference."""
    v, base = _num(v), _num(base)
    if v is None:
        return {"text": "–", "delta": None}
    pct = key not in ("n", "caption_words")
    text = f"{100 * v:.1f}" if pct else (f"{v:.1f}" if key == "caption_words" else str(int(v)))
    delta = None
    if base is not None and key != "n":
        d = 100 * (v - base) if pct else v - base
        delta = f"{d:+.1f}"
    return {"text": text, "delta": delta}


def curves_data(runs: list[Run]) -> dict:
    out = []
    for r in runs:
        if r.kind != "train" or not r.metrics:
            continue
        steps = [m.get("step", i + 1) for i, m in enumerate(r.metrics)]
        series = {}
        for key, _ in CURVES:
            if key.startswith("eval."):
                vals = [_num((m.get("eval") or {}).get(key[5:])) for m in r.metrics]
            else:
                src = key if any(key in m for m in r.metrics) else "caption_tokens" if key == "caption_words" else key
                vals = [_num(m.get(src)) for m in r.metrics]
            if any(v is not None for v in vals):
                series[key] = vals
        for ph in PHASES:
            vals = [_num(m.get(f"time_{ph}")) for m in r.metrics]
            if any(v is not None for v in vals):
                series[f"time_{ph}"] = vals
        out.append({"label": r.label, "steps": steps, "series": series})
    return {"runs": out, "panels": [{"key": k, "title": t} for k, t in CURVES],
            "phases": [p for p in PHASES]}


def eval_groups(runs: list[Run]) -> list[dict]:
    """Evaluation tables, one group per dataset (world, or each benchmark); differences against the group's first
    run (the pretrained one when a directory is named so)."""
    groups: dict[str, list[Run]] = {}
    for r in runs:
        if r.kind == "eval" and (r.summary.get("overall") or r.episodes):
            groups.setdefault(r.dataset, []).append(r)
    out = []
    for name, rs in groups.items():
        base = rs[0]
        overall = []
        for r in rs:
            o = r.summary.get("overall") or {}
            bo = base.summary.get("overall") or {} if r is not base else {}
            overall.append({"run": r.label, "cells": [_cell(k, o.get(k), bo.get(k)) for k, _ in OVERALL]})
        breakdowns = []
        for key, title in (("by_category", "by benchmark category"), ("by_family", "by family"),
                           ("by_needed", "by facts needed")):
            if key == "by_category" and name == "world":
                continue
            if key == "by_family" and name != "world":
                continue
            cats: list[str] = []
            for r in rs:
                for c in r.summary.get(key) or {}:
                    if c not in cats:
                        cats.append(c)
            if key == "by_needed" and set(cats) <= {"0"}:
                continue
            if not cats:
                continue
            rows = []
            for c in cats:
                cells = []
                b = (base.summary.get(key) or {}).get(c) or {}
                for r in rs:
                    m = (r.summary.get(key) or {}).get(c) or {}
                    bb = b if r is not base else {}
                    cells.append({"n": m.get("n"), "acc": _cell("accuracy", m.get("accuracy"), bb.get("accuracy")),
                                  "clar": _cell("clarification_rate", m.get("clarification_rate"),
                                                bb.get("clarification_rate"))})
                rows.append({"name": c if key != "by_needed" else f"{c} fact(s)", "cells": cells})
            breakdowns.append({"title": title, "rows": rows})
        ckey = "by_family" if name == "world" else "by_category"
        cats = [c for c in dict.fromkeys(c for r in rs for c in r.summary.get(ckey) or {})]
        chart = {"name": name, "by": ckey.replace("_", " "), "cats": cats, "runs": [
            {"label": r.label, "acc": [None if _num(((r.summary.get(ckey) or {}).get(c) or {}).get("accuracy")) is None
                                       else 100 * r.summary[ckey][c]["accuracy"] for c in cats]} for r in rs]}
        out.append({"name": name, "runs": [r.label for r in rs], "baseline": base.label, "chart": chart,
                    "head": [h for _, h in OVERALL], "overall": overall, "breakdowns": breakdowns,
                    "paths": {r.label: r.path for r in rs}})
    return out


def _split_train(r: Run) -> dict[str, list[dict]]:
    """A training run's logged episodes as two sources: its first and its last quarter of steps."""
    steps = sorted({e["step"] for e in r.episodes if e.get("step") is not None})
    if not steps:
        return {}
    q = max(1, len(steps) // 4)
    early, late = steps[:q], steps[-q:]
    if len(steps) == 1:
        return {f"{r.label} (step {steps[0]})": r.episodes}
    pick = lambda ss: [e for e in r.episodes if e.get("step") in set(ss)]   # noqa: E731
    return {f"{r.label} steps {early[0]}–{early[-1]}": pick(early), f"{r.label} steps {late[0]}–{late[-1]}": pick(late)}


def _table(tab: dict, value: str) -> dict:
    """A pattern table as rows of formatted cells (``value``: share or per100)."""
    rows = []
    for k in tab["kinds"]:
        cells = []
        for s in tab["sources"]:
            c = tab["rows"][k][s]
            v = c[value]
            cells.append({"text": "–" if v is None else (f"{100 * v:.1f}" if value == "share" else f"{v:.1f}"),
                          "count": c["count"]})
        rows.append({"kind": k, "cells": cells, "examples": tab["examples"].get(k, [])})
    totals = [{"asked": tab["totals"][s]["asked"], "n": tab["totals"][s]["n"]} for s in tab["sources"]]
    return {"sources": tab["sources"], "rows": rows, "totals": totals}


def pattern_sections(runs: list[Run]) -> list[dict]:
    """Clarification patterns per dataset group of evaluations, and per training run (first vs last steps)."""
    sections = []
    groups: dict[str, dict[str, list[dict]]] = {}
    for r in runs:
        if r.kind == "eval" and r.episodes:
            groups.setdefault(r.dataset, {})[r.label] = r.episodes
    todo = [(f"evaluation: {name}", name == "world", src) for name, src in groups.items()]
    for r in runs:
        if r.kind == "train" and r.episodes:
            world = all(e["pid"].startswith("world-") for e in r.episodes)
            todo.append((f"training: {r.label} (logged episodes, first vs last quarter of steps)", world,
                         _split_train(r)))
    for title, world, src in todo:
        if not src:
            continue
        sec = {"title": title, "world": world, "tables": []}
        if world:
            t = patterns.pattern_table(src, patterns.world_fact_kind, tuple(patterns.FACT_KIND_LABELS.values()))
            sec["tables"].append({"title": "what the reasoner asks for, by fact kind", **_table(t, "share"),
                                  "per100": _table(t, "per100")["rows"], "raw": t, "collapsed": False})
            fl = patterns.front_loaded(src)
            sec["front"] = {"sources": list(src), "rows": [
                {"kind": k, "cells": [{"text": f"{100 * v[s]['share']:.1f}" if s in v else "–",
                                       "count": v[s]["stated"] if s in v else None,
                                       "n": v[s]["needed"] if s in v else None} for s in src]}
                for k, v in fl.items()]}
            nd = patterns.by_needed(src)
            sec["needed"] = {"sources": list(src), "rows": [
                {"name": f"{k} fact(s)", "cells": [{"text": f"{100 * v[s]['rate']:.1f}" if s in v else "–",
                                                    "n": v[s]["n"] if s in v else None} for s in src]}
                for k, v in nd.items()]}
        t = patterns.pattern_table(src, patterns.question_kind, patterns.QUESTION_KINDS)
        sec["tables"].append({"title": "what the reasoner asks for, by question kind (rule-based classifier)",
                              **_table(t, "share"), "per100": _table(t, "per100")["rows"], "raw": t,
                              "collapsed": world})
        sections.append(sec)
    return sections


def patterns_markdown(sections: list[dict], header: str = "") -> str:
    """The clarification-pattern tables as Markdown (share % of the questions asked, with counts)."""
    lines = ["# Clarification patterns", ""] + ([header, ""] if header else [])
    for s in sections:
        lines += [f"## {s['title']}", ""]
        for t in s["tables"]:
            lines += [f"**{t['title']}** — share of the questions asked, % (count)", "",
                      "| kind | " + " | ".join(f"{src} ({tot['asked']} asked / {tot['n']})"
                                               for src, tot in zip(t["sources"], t["totals"])) + " | examples |",
                      "|---|" + "---|" * (len(t["sources"]) + 1)]
            for r in t["rows"]:
                cells = [f"{c['text']} ({c['count']})" for c in r["cells"]]
                ex = " · ".join(f"`{q}`" for q in r["examples"][:2])
                lines.append(f"| {r['kind']} | " + " | ".join(cells) + f" | {ex} |")
            lines.append("")
        for key, title in (("front", "needed fact already stated in the caption, % of needed facts (stated/needed)"),
                           ("needed", "clarification rate % by facts needed")):
            tab = s.get(key)
            if not tab or not tab["rows"]:
                continue
            lines += [f"**{title}**", "", "| | " + " | ".join(tab["sources"]) + " |",
                      "|---|" + "---|" * len(tab["sources"])]
            for r in tab["rows"]:
                if key == "front":
                    cells = [f"{c['text']} ({c['count']}/{c['n']})" if c["n"] else "–" for c in r["cells"]]
                else:
                    cells = [f"{c['text']} (n={c['n']})" if c["n"] else "–" for c in r["cells"]]
                lines.append(f"| {r.get('kind') or r.get('name')} | " + " | ".join(cells) + " |")
            lines.append("")
    return "\n".join(lines)


class _Problems:
    """Question, gold, family and image of the problems behind episodes: world problems are drawn again from their
    id (under the run's world config, or the first known config that gives the recorded question), benchmark
    problems are read from the evaluation's ``data`` path when it still exists."""

    def __init__(self, runs: list[Run], extra_world=None):
        self.configs = []
        seen = set()
        for c in [extra_world] + [rr.world_config_of(r.config) for r in runs] + [WorldConfig()]:
            if c is not None and (key := json.dumps(vars(c), sort_keys=True, default=str)) not in seen:
                seen.add(key)
                self.configs.append(c)
        self.cache: dict = {}
        self.images: dict[str, str] = {}
        self.benchmarks: dict = {}
        self.missing = 0

    def world(self, pid: str, cfg=None, question=None, answer=None):
        cands = [cfg] if cfg is not None else self.configs
        for i, c in enumerate(cands):
            key = (pid, json.dumps(vars(c), sort_keys=True, default=str))
            if key not in self.cache:
                self.cache[key] = rr.world_problem(pid, c)
            p = self.cache[key]
            if p is not None and (question is None or p.question == question) and \
                    (answer is None or p.answer == str(answer)):
                return p, f"{pid}@{self.configs.index(c) if c in self.configs else 'r' + str(i)}"
        return None, pid

    def benchmark(self, run: Run) -> dict:
        data, name = run.summary.get("data"), run.dataset
        if not data or not os.path.exists(str(data)) or name in ("world", "mixed"):
            return {}
        if (name, data) not in self.benchmarks:
            try:
                res = load_benchmark(name, data)
                self.benchmarks[(name, data)] = {p.id: p for p in res.problems}
            except Exception as e:   # noqa: BLE001 - a stale data path only costs the images
                print(f"acrl report: no images for {run.label}: {type(e).__name__}: {e}")
                self.benchmarks[(name, data)] = {}
        return self.benchmarks[(name, data)]

    def fill(self, runs: list[Run]) -> None:
        from PIL import Image

        for r in runs:
            cfg = rr.world_config_of(r.config) if r.kind == "train" else None
            bench = self.benchmark(r) if r.kind == "eval" else {}
            for e in r.episodes:
                e["pkey"], p = e["pid"], None
                if e["pid"].startswith("world-"):
                    q = e["question"] if r.kind == "eval" else None
                    p, e["pkey"] = self.world(e["pid"], cfg, q, e["gold"] if r.kind == "eval" else None)
                elif e["pid"] in bench:
                    p = bench[e["pid"]]
                if p is not None:
                    e["question"] = e["question"] or p.question_with_choices()
                    e["gold"] = e["gold"] if e["gold"] is not None else p.answer
                    e["family"] = e["family"] or p.family
                    e["category"] = e["category"] or p.category
                    e["needed"] = e["needed"] if e["needed"] is not None else len(p.needed)
                img = None
                path = e["extra"].get("image") if isinstance(e["extra"].get("image"), str) else None
                if p is not None and p.image is not None:
                    img = p.image
                elif path:
                    full = path if os.path.isabs(path) else os.path.join(r.path, path)
                    if os.path.exists(full):
                        img = Image.open(full)
                if img is not None and e["pkey"] not in self.images:
                    self.images[e["pkey"]] = rr.data_uri(img)
                e["img"] = e["pkey"] if e["pkey"] in self.images else None
                self.missing += e["img"] is None


def build_report(roots: list[str], out: str, train_episodes: int = 200, world_config=None,
                 title: str | None = None, filename: str = "report.html", patterns_md: str | None = None) -> str:
    """Write ``out/<filename>`` from every run under ``roots``; returns its path. With ``patterns_md`` (a header
    line), also write the clarification-pattern tables to ``out/clarification-patterns.md``."""
    from jinja2 import Environment, PackageLoader, select_autoescape
    from plotly.offline import get_plotlyjs

    found = rr.find_runs(roots)
    if not found:
        raise ValueError(f"acrl report: no training run (metrics.jsonl) or evaluation (items.jsonl, summary.json) "
                         f"under {', '.join(roots)}")
    runs = [rr.load_run(*f) for f in found]
    probs = _Problems(runs, world_config)
    probs.fill(runs)
    for r in runs:
        for e in r.episodes:
            e["fact_kind"] = patterns.world_fact_kind(e["clar_q"]) if e["pid"].startswith("world-") else None
            e["q_kind"] = patterns.question_kind(e["clar_q"])
    browse = []
    for r in runs:
        browse += r.episodes if r.kind == "eval" else rr.sample_train_episodes(r.episodes, train_episodes)
    data = {
        "curves": curves_data(runs),
        "episodes": clean(browse),
        "images": probs.images,
        "runs": [{"label": r.label, "kind": r.kind} for r in runs],
        "tiers": list(TIERS),
    }
    evals = eval_groups(runs)
    data["eval_charts"] = [g["chart"] for g in evals]
    sections = pattern_sections(runs)
    data["patterns"] = [{"title": s["title"], "tables": [clean(t["raw"]) for t in s["tables"]]} for s in sections]
    env = Environment(loader=PackageLoader("acrl", "templates"), autoescape=select_autoescape(["html", "j2"]))
    page = env.get_template("report.html.j2").render(
        title=title or "acrl report: " + ", ".join(os.path.basename(os.path.normpath(r)) for r in roots),
        generated=time.strftime("%Y-%m-%d %H:%M"), runs=runs, evals=evals, sections=sections,
        data=data, plotly_js=get_plotlyjs(), n_train=sum(r.kind == "train" for r in runs),
        bad_lines=sum(r.bad_lines for r in runs), train_limit=train_episodes,
    )
    if patterns_md is not None:   # each file replaced whole: a full disk leaves the previous one
        outdir.write_text(os.path.join(out, "clarification-patterns.md"), patterns_markdown(sections, patterns_md))
    path = os.path.join(out, filename)
    outdir.write_text(path, page)
    return path
