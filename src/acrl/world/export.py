"""Write world problems to disk: PNG images, ``problems.jsonl`` and a contact sheet of examples."""

from __future__ import annotations

import json
import os
import random

from acrl.problem import Problem
from acrl.world import clarification_pairs, human_caption_for


def write_dataset(problems: list[Problem], out: str, rng: random.Random | None = None, fact_rate: float = 0.3,
                  sheet: int = 16) -> str:
    """Images under ``out/images/``, one JSON line per problem (with a human caption and the clarification QA
    pairs) in ``out/problems.jsonl``, and ``out/contact_sheet.png``. Returns the JSONL path."""
    rng = rng or random.Random(0)
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    path = os.path.join(out, "problems.jsonl")
    with open(path, "w") as fh:
        for p in problems:
            rel = os.path.join("images", f"{p.id}.png")
            p.image.save(os.path.join(out, rel))
            rec = p.to_json()
            rec["image"] = rel
            rec["human_caption"] = human_caption_for(p, rng, fact_rate)
            rec["clarifications"] = clarification_pairs(p)
            fh.write(json.dumps(rec) + "\n")
    contact_sheet(problems[:sheet], os.path.join(out, "contact_sheet.png"))
    return path


def contact_sheet(problems: list[Problem], path: str, cols: int = 4) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = max(1, (len(problems) + cols - 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, p in zip(axes.flat, problems):
        ax.imshow(p.image, interpolation="nearest")
        q = p.question_with_choices().replace("\n", " ")
        ax.set_title(f"{p.family}: {q}\nanswer: {p.answer}", fontsize=7, wrap=True)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
