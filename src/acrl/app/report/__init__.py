"""``acrl report``: one self-contained HTML page from the outputs of ``acrl train``, ``eval``, ``demo`` and sweeps.

Usage::

    acrl report runs/demo --out runs/demo-report          # writes runs/demo-report/report.html
    acrl report runs/a runs/b --out /tmp/cmp              # several runs overlaid and compared

See :mod:`acrl.app.report.page` (the page), :mod:`acrl.app.report.runs` (what is read) and
:mod:`acrl.app.report.patterns` (the clarification-pattern classifiers).
"""

from __future__ import annotations

import argparse

from acrl.app.report.page import build_report
from acrl.config import load_config

__all__ = ["build_report", "add_report_parser", "cmd_report"]


def cmd_report(args) -> int:
    world = None
    if args.config:
        world = load_config(args.config, []).world
    path = build_report(args.runs, args.out, train_episodes=args.train_episodes, world_config=world,
                        title=args.title, patterns_md=f"From: {' '.join(args.runs)}.")
    print(f"report written to {path}")
    return 0


def add_report_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``report`` on an argparse subparsers object (``acrl report RUN [RUN ...] --out DIR``)."""
    p = subparsers.add_parser("report", help="one self-contained HTML page (curves, tables, episode browser, "
                                             "clarification patterns) from train / eval / demo / sweep outputs")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories: any directory holding training runs "
                                                          "(metrics.jsonl) or evaluations (items.jsonl), at any depth")
    p.add_argument("--out", required=True, help="directory to write report.html (and clarification-patterns.md) "
                                                "into")
    p.add_argument("--train-episodes", type=int, default=200,
                   help="training episodes per run shown in the browser (whole groups, spread over the run)")
    p.add_argument("--config", help="YAML config whose world section drew the evaluated problems (to redraw "
                                    "their images); by default the runs' own configs and the default world are tried")
    p.add_argument("--title", help="page title")
    p.set_defaults(fn=cmd_report)
    return p
