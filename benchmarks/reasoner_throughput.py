"""Throughput of the HTTP reasoner path: ``OpenAIReasoner`` against a served world reasoner.

    python benchmarks/reasoner_throughput.py [--concurrency 1 4 16 64] [--max-requests 3000] [--max-seconds 8]
                                             [--in-process]

Starts ``acrl serve reasoner --backend world --port 0`` in a subprocess (``--in-process``: a server thread in this
process, sharing its interpreter lock with the client), then for each client concurrency sends batches of real
decision prompts (world problems with human-style captions) through ``OpenAIReasoner.complete`` until
``--max-requests`` requests or ``--max-seconds`` have passed (after one warm-up batch). The in-process
``WorldReasoner`` rate is the no-HTTP reference. Writes ``benchmarks/results/reasoner_throughput.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import time

import httpx
import openai

from acrl.backends.openai_api import OpenAIReasoner
from acrl.rollout.prompts import decision_prompt
from acrl.world import human_caption_for, make_problems
from acrl.world.reasoner import WorldReasoner

HERE = os.path.dirname(os.path.abspath(__file__))


def _prompts(n: int) -> list[str]:
    rng = random.Random(0)
    return [decision_prompt(p.question_with_choices(), human_caption_for(p, rng, 0.5))
            for p in make_problems("test", n)]


def _start_subprocess() -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "acrl.app.serve", "reasoner", "--backend", "world", "--port", "0"],
                            stdout=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline()
    if " at http" not in line:
        proc.kill()
        raise RuntimeError(f"server did not start: {line!r}")
    url = line.rsplit(" at ", 1)[1].strip()
    for _ in range(100):
        try:
            if httpx.get(url.removesuffix("/v1") + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.05)
    return proc, url


def measure(url: str, prompts: list[str], concurrency: int, max_requests: int, max_seconds: float) -> dict:
    r = OpenAIReasoner(url, "world", concurrency=concurrency, timeout=30, max_retries=2)
    batch = max(64, 4 * concurrency)
    r.complete(prompts[:batch])                                   # warm-up: connections, loop thread
    base = r.stats()
    sent, t0 = 0, time.perf_counter()
    while sent < max_requests and time.perf_counter() - t0 < max_seconds:
        start = sent % len(prompts)
        chunk = (prompts[start:] + prompts)[:batch]
        out = r.complete(chunk)
        bad = [o for o in out if isinstance(o, Exception)]
        if bad:
            raise RuntimeError(f"{len(bad)} failed requests, first: {bad[0]}")
        sent += len(chunk)
    wall = time.perf_counter() - t0
    s = r.stats()
    r.close()
    rps = sent / wall
    return {"concurrency": concurrency, "requests": sent, "seconds": round(wall, 3),
            "requests_per_second": round(rps, 1), "batch": batch,
            "mean_latency_ms": round(1000 * concurrency / rps, 2),      # Little's law at full occupancy
            "retries": s["retries"] - base["retries"], "failures": s["failures"] - base["failures"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--max-requests", type=int, default=3000)
    ap.add_argument("--max-seconds", type=float, default=8.0)
    ap.add_argument("--in-process", action="store_true", help="serve from a thread of this process")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "reasoner_throughput.json"))
    args = ap.parse_args()
    prompts = _prompts(512)
    load_before = os.getloadavg()[0]

    t = time.perf_counter()
    WorldReasoner().complete(prompts)
    local_rps = len(prompts) / (time.perf_counter() - t)

    proc = server = None
    if args.in_process:
        from acrl.app.serve import WorldBackend, start_server

        server, _, url = start_server(WorldBackend())
    else:
        proc, url = _start_subprocess()
    try:
        rows = []
        for c in args.concurrency:
            rows.append(measure(url, prompts, c, args.max_requests, args.max_seconds))
            print(json.dumps(rows[-1]), flush=True)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=10)
        if server is not None:
            server.shutdown()
            server.server_close()
    result = {
        "what": "OpenAIReasoner requests/s against `acrl serve reasoner --backend world` on 127.0.0.1 "
                "(threaded standard-library HTTP server, HTTP/1.1 keep-alive)",
        "server": "thread in the client process" if args.in_process else "subprocess",
        "in_process_world_reasoner_prompts_per_second": round(local_rps, 1),
        "results": rows, "max_requests": args.max_requests, "max_seconds": args.max_seconds,
        "openai": openai.__version__, "python": platform.python_version(), "machine": platform.machine(),
        "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d"),
        "load_average_1min": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
