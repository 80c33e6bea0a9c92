"""The demo report: a Markdown table (pretrained / binary RL / AC-RL) and PNG learning curves."""

from __future__ import annotations

import math
import os


def _pct(x) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def _mean(hist: list[dict], key: str) -> float:
    vals = [h[key] for h in hist if key in h]
    return sum(vals) / len(vals) if vals else float("nan")


def plot_curves(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("reward", "sampled reward (train)"), ("direct_correct", "correct without clarification (train)"),
              ("clarification_rate", "clarification rate (train)"), ("uniform_frac", "uniform-reward groups (train)"),
              ("eval.accuracy", "held-out single-pass accuracy"), ("eval.clarification_rate",
                                                                   "held-out clarification rate")]
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    for ax, (key, title) in zip(axes.flat, panels):
        for arm, colour in (("acrl", "tab:blue"), ("binary", "tab:orange")):
            hist = result.get(f"{arm}_history", [])
            if key.startswith("eval."):
                pts = [(0, result["pretrained"]["overall"][key[5:]])] if "pretrained" in result else []
                pts += [(h["step"], h["eval"][key[5:]]) for h in hist if "eval" in h]
                if pts:
                    ax.plot(*zip(*pts), marker="o", color=colour, label=arm)
            else:
                pts = [(h["step"], h[key]) for h in hist if key in h]
                if pts:
                    xs, ys = zip(*pts)
                    k = 5
                    smooth = [sum(ys[max(0, i - k + 1):i + 1]) / len(ys[max(0, i - k + 1):i + 1])
                              for i in range(len(ys))]
                    ax.plot(xs, ys, color=colour, alpha=0.25)
                    ax.plot(xs, smooth, color=colour, label=arm)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"regime: {result['regime']}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def regime_table(r: dict) -> str:
    lines = ["| captioner | single-pass acc % | clar. rate % | acc. with clar. % | Acc_deny % | uniform groups % "
             "(train mean) | KL (train mean) | caption words |", "|---|---|---|---|---|---|---|---|"]
    for arm, label in (("pretrained", "pretrained (warm start)"), ("binary", "binary-reward RL (α=0)"),
                       ("acrl", "AC-RL (α=0.7)")):
        if arm not in r:
            continue
        o = r[arm]["overall"]
        hist = r.get(f"{arm}_history", [])
        uni = _mean(hist, "uniform_frac") if hist else float("nan")
        kl = _mean(hist, "kl_mean") if hist else float("nan")
        lines.append(f"| {label} | {_pct(o['accuracy'])} | {_pct(o['clarification_rate'])} | "
                     f"{_pct(o['accuracy_with_clarification'])} | {_pct(o['acc_deny'])} | {_pct(uni)} | "
                     f"{'–' if math.isnan(kl) else f'{kl:.3f}'} | {o['caption_words']:.1f} |")
    lines += ["", "Single-pass accuracy % by number of facts the question needs:", ""]
    keys = sorted(r["pretrained"]["by_needed"])
    lines += ["| captioner | " + " | ".join(f"{k} fact(s) (n={r['pretrained']['by_needed'][k]['n']})" for k in keys)
              + " |", "|---|" + "---|" * len(keys)]
    for arm in ("pretrained", "binary", "acrl"):
        if arm in r:
            lines.append(f"| {arm} | " + " | ".join(_pct(r[arm]["by_needed"][k]["accuracy"]) for k in keys) + " |")
    fams = sorted(r["pretrained"]["by_family"])
    lines += ["", "Single-pass accuracy % by family:", "", "| captioner | " + " | ".join(fams) + " |",
              "|---|" + "---|" * len(fams)]
    for arm in ("pretrained", "binary", "acrl"):
        if arm in r:
            lines.append(f"| {arm} | " + " | ".join(_pct(r[arm]["by_family"][f]["accuracy"]) for f in fams) + " |")
    return "\n".join(lines) + "\n"


def verdict(r: dict) -> str:
    p, a = r["pretrained"]["overall"], r["acrl"]["overall"]
    gain = 100 * (a["accuracy"] - p["accuracy"])
    cut = 1 - a["clarification_rate"] / p["clarification_rate"] if p["clarification_rate"] else float("nan")
    b = r["binary"]["overall"]
    lead = ("AC-RL" if a["accuracy"] > b["accuracy"] else "binary-reward RL" if b["accuracy"] > a["accuracy"]
            else "neither")
    return (f"AC-RL changed single-pass accuracy by {gain:+.1f} points over the pretrained captioner "
            f"(target: at least +10) and its clarification rate by {-100 * cut:+.0f}% relative (target: at least "
            f"-30%). On final single-pass accuracy {lead} is ahead "
            f"({_pct(a['accuracy'])}% AC-RL vs {_pct(b['accuracy'])}% binary).")


def write_report(results: list[dict], out: str, cfg: dict | None = None, minutes: float | None = None,
                 html: str | None = None) -> str:
    """``out/report.md``; ``html`` names the interactive page written beside it (linked from the report)."""
    parts = ["# acrl demo report", ""]
    if minutes is not None:
        parts.append(f"Wall time: {minutes:.1f} min.")
    if cfg:
        t = cfg["train"]
        parts.append(f"Training: {t['steps']} steps × {t['problems_per_step']} problems × "
                     f"{t['samples_per_problem']} captions, advantage `{t['advantage']}`, lr {t['lr']}, "
                     f"KL β {t['kl_beta']}; evaluation on {cfg['eval']['n']} held-out `{cfg['eval']['split']}` "
                     "problems with greedy captions.")
    if html:
        parts.append(f"Curves, tables, an episode browser and the clarification patterns: [{html}]({html}).")
    parts.append("")
    for r in results:
        png = f"curves-{r['regime']}.png"
        plot_curves(r, os.path.join(out, png))
        parts += [f"## Regime: {r['regime']}", "", verdict(r), "", regime_table(r), f"![learning curves]({png})", ""]
    path = os.path.join(out, "report.md")
    with open(path, "w") as fh:
        fh.write("\n".join(parts))
    return path
