"""Find and read run outputs: training runs (``metrics.jsonl``, ``episodes.jsonl``, ``checkpoint/config.json``) and
evaluations (``summary.json``, ``items.jsonl``), wherever they sit under the directories given (``acrl train``,
``acrl eval``, ``acrl eval --benchmark all``, ``acrl demo``, a sweep's run directories).

Every record becomes one *episode* dict with the same keys (see :func:`eval_episode`, :func:`train_episode`); fields
a record does not have are ``None``, and fields this module does not know are kept under ``extra`` so the page can
show them.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
from dataclasses import dataclass, field

from acrl.core.reward import tier_reward
from acrl.world import WorldConfig, make_problem

_KNOWN_ITEM = {"id", "family", "category", "needed", "question", "answer", "caption", "prediction", "correct",
               "failed", "malformed", "asked", "clarification_question", "clarification", "clarified_prediction",
               "clarified_correct", "deny_correct", "deny_prediction", "errors", "error"}
_KNOWN_EPISODE = {"step", "problem_id", "group", "sample", "caption", "decision", "question", "clarification",
                  "prediction", "correct", "tier", "reward", "malformed", "error", "deny_prediction", "deny_correct",
                  "replies"}


@dataclass
class Run:
    """One training run or one evaluation found on disk."""

    label: str
    path: str
    kind: str                                   # train | eval
    metrics: list[dict] = field(default_factory=list)
    episodes: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    config: dict | None = None                  # checkpoint/config.json of a training run
    bad_lines: int = 0                          # JSONL lines that did not parse (an interrupted write)

    @property
    def dataset(self) -> str:
        """What an evaluation ran on: ``world`` or the benchmark name (evaluations are compared within one)."""
        fams = {e["family"] for e in self.episodes if e.get("family")}
        if not self.episodes or all(str(e["pid"]).startswith("world-") for e in self.episodes):
            return "world"
        return sorted(fams)[0] if len(fams) == 1 else "mixed"


def read_jsonl(path: str) -> tuple[list[dict], int]:
    """Rows of a JSONL file and the number of lines that did not parse."""
    rows, bad = [], 0
    with open(path) as fh:
        for line in fh:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if isinstance(row, dict):
                rows.append(row)
            else:
                bad += 1
    return rows, bad


def clean(x):
    """JSON-safe copy: NaN and infinities become ``None``."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [clean(v) for v in x]
    return x


def _sort_key(path: str) -> tuple:
    head, name = os.path.split(path)
    return head, 0 if "pretrained" in name else 1, name


def find_runs(roots: list[str]) -> list[tuple[str, str, str]]:
    """``(label, path, kind)`` for every training run and evaluation under ``roots``, in order: roots as given;
    within a root sorted by path, a directory whose name contains ``pretrained`` before its siblings."""
    found = []
    for root in roots:
        if not os.path.isdir(root):
            raise FileNotFoundError(f"acrl report: run directory {root!r} does not exist")
        base = os.path.basename(os.path.normpath(root))
        hits = []
        for d, dirs, files in os.walk(root):
            dirs[:] = sorted(x for x in dirs if not x.startswith(("checkpoint", ".")) and x != "images")
            if "metrics.jsonl" in files:
                hits.append((d, "train"))
            if "items.jsonl" in files or "summary.json" in files:
                hits.append((d, "eval"))
        for d, kind in sorted(hits, key=lambda h: _sort_key(h[0])):
            rel = os.path.relpath(d, root)
            label = base if rel == "." else rel if len(roots) == 1 else f"{base}/{rel}"
            found.append((label, d, kind))
    labels = [f[0] for f in found]
    return [(f"{lab} ({kind})" if labels.count(lab) > 1 else lab, d, kind) for lab, d, kind in found]


def run_config(path: str) -> dict | None:
    """The config a training run was made with: ``run.json``'s, else the newest checkpoint's ``config.json``."""
    info = os.path.join(path, "run.json")
    if os.path.exists(info):
        with open(info) as fh:
            cfg = json.load(fh).get("config")
        if isinstance(cfg, dict):
            return cfg
    names = sorted((n for n in os.listdir(path) if n.startswith("checkpoint")), reverse=True)
    for n in ["checkpoint"] + names:
        cfg = os.path.join(path, n, "config.json")
        if os.path.exists(cfg):
            with open(cfg) as fh:
                return json.load(fh)
    return None


def load_run(label: str, path: str, kind: str) -> Run:
    run = Run(label=label, path=path, kind=kind)
    if kind == "train":
        run.metrics, bad = read_jsonl(os.path.join(path, "metrics.jsonl"))
        run.bad_lines += bad
        ep = os.path.join(path, "episodes.jsonl")
        if os.path.exists(ep):
            rows, bad = read_jsonl(ep)
            run.bad_lines += bad
            run.episodes = [train_episode(r, label) for r in rows]
        run.config = run_config(path)
        alpha = ((run.config or {}).get("train") or {}).get("alpha")
        run.summary = {"alpha": alpha}
    else:
        sp = os.path.join(path, "summary.json")
        if os.path.exists(sp):
            with open(sp) as fh:
                run.summary = json.load(fh)
        ip = os.path.join(path, "items.jsonl")
        if os.path.exists(ip):
            rows, bad = read_jsonl(ip)
            run.bad_lines += bad
            run.episodes = [eval_episode(r, label) for r in rows if "id" in r]
    return run


def eval_tier(item: dict) -> str:
    """The clarification-enabled outcome of an evaluation item, as a training tier."""
    if item.get("failed"):
        return "failed"
    if item.get("clarified_correct"):
        return "clarified_correct" if item.get("asked") else "direct_correct"
    return "wrong"


def _replies(rec: dict) -> list[dict]:
    """Raw reasoner replies as ``[{"label", "text"}]``, under whatever name the record keeps them: a list
    (``replies``: the turns in order), a dict (``{"decision": ..., "final": ...}``) or single strings
    (``reply``, ``raw_reply``, ...)."""
    out: list[dict] = []
    for k, v in rec.items():
        if "repl" not in k.lower() or v is None:
            continue
        if isinstance(v, dict):
            out += [{"label": str(kk), "text": _text(t)} for kk, t in v.items() if t is not None]
        elif isinstance(v, list):
            out += [{"label": f"turn {i + 1}", "text": _text(t)} for i, t in enumerate(v) if t is not None]
        else:
            out.append({"label": k, "text": _text(v)})
    return out


def _text(x) -> str:
    return x if isinstance(x, str) else json.dumps(x)


def eval_episode(item: dict, run: str, alpha: float = 0.7) -> dict:
    """One evaluation item as an episode: the clarification-enabled transcript plus the single-pass answer."""
    tier = eval_tier(item)
    return {
        "run": run, "source": "eval", "pid": str(item["id"]), "step": None, "sample": None,
        "family": item.get("family") or "", "category": item.get("category") or "", "needed": item.get("needed"),
        "question": item.get("question"), "gold": item.get("answer"), "caption": item.get("caption") or "",
        "replies": _replies(item), "asked": bool(item.get("asked")),
        "clar_q": item.get("clarification_question"), "clar_a": item.get("clarification"),
        "final": item.get("clarified_prediction"), "single_pass": item.get("prediction"),
        "single_pass_correct": item.get("correct"), "deny_correct": item.get("deny_correct"),
        "deny_prediction": item.get("deny_prediction"), "tier": tier, "alpha": alpha,
        # an item's own reward when it has one (several turns, scheduled α); else the one-turn tier reward
        "reward": None if tier == "failed" else item.get("reward", tier_reward(tier, alpha)),
        "malformed": item.get("malformed"), "error": _errors(item),
        "extra": clean({k: v for k, v in item.items() if k not in _KNOWN_ITEM and "repl" not in k.lower()}),
    }


def _errors(item: dict) -> str | None:
    errs = ([item["error"]] if item.get("error") else []) + [e if isinstance(e, str) else json.dumps(e)
                                                              for e in item.get("errors") or []]
    return "; ".join(errs) or None


def train_episode(rec: dict, run: str) -> dict:
    """One logged training episode (question, gold and family are filled in later for world problems)."""
    return {
        "run": run, "source": "train", "pid": str(rec.get("problem_id", "")), "step": rec.get("step"),
        "sample": rec.get("sample"), "family": rec.get("family") or "", "category": rec.get("category") or "",
        "needed": rec.get("needed"), "question": rec.get("problem_question"), "gold": rec.get("answer"),
        "caption": rec.get("caption") or "", "replies": _replies(rec), "asked": rec.get("decision") == "ask",
        "clar_q": rec.get("question"), "clar_a": rec.get("clarification"), "final": rec.get("prediction"),
        "single_pass": None, "single_pass_correct": None, "deny_correct": rec.get("deny_correct"),
        "deny_prediction": rec.get("deny_prediction"),
        "tier": rec.get("tier") or "wrong", "reward": clean(rec.get("reward")), "alpha": None,
        "malformed": rec.get("malformed"), "error": rec.get("error"),
        "extra": clean({k: v for k, v in rec.items() if k not in _KNOWN_EPISODE and "repl" not in k.lower()}),
    }


def sample_train_episodes(episodes: list[dict], limit: int) -> list[dict]:
    """At most ``limit`` training episodes, whole groups (the M captions of one problem at one step) taken evenly
    across the run, always including the first and the last group."""
    groups: dict[tuple, list[dict]] = {}
    for e in episodes:
        groups.setdefault((e["step"], e["pid"]), []).append(e)
    keys = list(groups)
    if not keys or sum(map(len, groups.values())) <= limit:
        return list(episodes)
    per = max(1, max(len(g) for g in groups.values()))
    k = max(1, min(len(keys), limit // per))
    picks = sorted({round(i * (len(keys) - 1) / max(1, k - 1)) for i in range(k)}) if k > 1 else [len(keys) - 1]
    out = [e for i in picks for e in groups[keys[i]]]
    return out[:limit]


# --- problems and images -------------------------------------------------------------------------------------------

def world_config_of(cfg: dict | None):
    """A :class:`~acrl.world.WorldConfig` from a saved run config (``None`` if it has no world section)."""
    w = (cfg or {}).get("world")
    if not isinstance(w, dict):
        return None
    try:
        return WorldConfig(**w)
    except (TypeError, ValueError):
        return None


def world_problem(pid: str, cfg, question: str | None = None, answer: str | None = None):
    """The world problem ``world-<split>-<index>`` drawn under ``cfg`` (a WorldConfig); ``None`` if ``pid`` is not
    a world id, or if ``question`` / ``answer`` are given and the drawn problem has others (another world config)."""
    parts = pid.split("-")
    if len(parts) != 3 or parts[0] != "world" or not parts[2].isdigit():
        return None
    try:
        p = make_problem(parts[1], int(parts[2]), cfg)
    except ValueError:
        return None
    if (question is not None and p.question != question) or (answer is not None and p.answer != str(answer)):
        return None
    return p


def data_uri(image, max_side: int = 320) -> str:
    """An image as a ``data:`` URI: PNG when small (world figures), else a JPEG thumbnail."""
    img = image.convert("RGB")
    if max(img.size) <= 128:
        buf = io.BytesIO()
        img.save(buf, format="PNG", optimize=True)
        return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    img.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=75)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
