"""Issue 16's stream c without a GPU: long and short jobs mixed, pool (late binding) against auto (shortest queue).

On the GPU (bench/affinity.py) stream c has 24 prompts on two workers that share one H200, so its p95 is about
the second-longest latency and moves with GPU contention between the workers. Here only the scheduling differs:
two CPU workers run the test pack's CPSleep node (it sleeps, so the workers do not compete for a core), jobs of
``--long-s`` and ``--short-s`` seconds in random order arrive at random (exponential gaps) at ``--load`` of the
workers' capacity, and the same arrival sequence goes to ``--default-route pool`` and ``--default-route auto``.
Latency: the client's send time to the history entry's execution_success timestamp (same clock, ms resolution).
Several seeds, each its own arrival sequence; every server runs with --no-persist (no store: its cost is another
benchmark's subject).

Writes bench/results/pool_mixed_cpu.md.

usage: .venv/bin/python bench/pool_mixed_cpu.py [--seeds 5] [--long 20] [--short 60] [--comfyui-version 0.33.0]
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from harness import Server  # noqa: E402

from comfy_parallel.ops import provision  # noqa: E402

ROUTES = ("pool", "auto")
QUANTILES = (("p50", 0.5), ("p90", 0.9), ("p95", 0.95))


def arrivals(seed: int, n_long: int, n_short: int, long_s: float, short_s: float, load: float,
             workers: int) -> list[tuple[float, float]]:
    """(seconds after the start, job seconds) for each prompt."""
    rng = random.Random(seed)
    jobs = [long_s] * n_long + [short_s] * n_short
    rng.shuffle(jobs)
    gap = statistics.mean(jobs) / (workers * load)
    out, t = [], 0.0
    for job in jobs:
        out.append((t, job))
        t += rng.expovariate(1.0 / gap)
    return out


def quantile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default, the standard library's "inclusive" method), so
    24 and 80 samples read alike; ``q`` in hundredths (0.95)."""
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


def run(s: Server, plan: list[tuple[float, float]], tag: str) -> list[tuple[float, float]]:
    """(job seconds, latency) per prompt of ``plan``, sent to ``s`` at their arrival times."""
    sent = []
    t0 = time.time()
    for i, (at, job) in enumerate(plan):
        delay = t0 + at - time.time()
        if delay > 0:
            time.sleep(delay)
        answer = s.submit({"1": {"class_type": "CPSleep", "inputs": {"seconds": job, "steps": 1,
                                                                     "tag": f"{tag}-{i}"}}})
        sent.append((answer["prompt_id"], time.time(), job))
    out = []
    for prompt_id, at, job in sent:
        entry = s.wait_history(prompt_id, timeout=300)
        end = [d["timestamp"] for event, d in entry["status"]["messages"] if event == "execution_success"]
        assert end, entry["status"]
        out.append((job, end[0] / 1000 - at))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--long", type=int, default=20, help="long jobs per sequence")
    ap.add_argument("--short", type=int, default=60, help="short jobs per sequence")
    ap.add_argument("--long-s", type=float, default=1.0)
    ap.add_argument("--short-s", type=float, default=0.15)
    ap.add_argument("--load", type=float, default=0.85, help="arrival rate over the two workers' capacity")
    ap.add_argument("--comfyui-version", default="0.33.0", choices=sorted(provision.RELEASES))
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "pool_mixed_cpu.md")
    args = ap.parse_args()
    comfy = provision.ensure_comfyui(args.comfyui_version, quiet=True)
    servers = {route: Server(comfy, devices="cpu,cpu", serve_args=["--default-route", route, "--no-persist"],
                             name=f"pool-mixed-{route}").start() for route in ROUTES}
    rows: list[tuple[int, str, dict[str, float]]] = []
    try:
        for seed in range(1, args.seeds + 1):
            plan = arrivals(seed, args.long, args.short, args.long_s, args.short_s, args.load, 2)
            for route in ROUTES if seed % 2 else ROUTES[::-1]:  # each goes first in turn
                got = run(servers[route], plan, f"{route}-{seed}")
                lat = [x for _, x in got]
                fig = {name: quantile(lat, q) for name, q in QUANTILES}
                fig["max"] = max(lat)
                fig["mean"] = statistics.mean(lat)
                fig["long p95"] = quantile([x for job, x in got if job == args.long_s], 0.95)
                fig["short p95"] = quantile([x for job, x in got if job == args.short_s], 0.95)
                rows.append((seed, route, fig))
                print(seed, route, {k: round(v, 3) for k, v in fig.items()}, flush=True)
    finally:
        for s in servers.values():
            s.stop()
    keys = ["mean", "p50", "p90", "p95", "max", "long p95", "short p95"]
    lines = [f"# Pool against shortest queue, long and short jobs mixed, CPU workers "
             f"({time.strftime('%Y-%m-%d', time.gmtime())})", "",
             f"Command: `.venv/bin/python {' '.join(sys.argv)}` (ComfyUI {args.comfyui_version}, 2 CPU workers; "
             f"{platform.node() or 'host'}, {platform.machine()}). Per seed: {args.long} jobs of {args.long_s} s and "
             f"{args.short} of {args.short_s} s in random order, exponential gaps at {args.load:.0%} of the "
             "workers' capacity; the same sequence to both servers. Latency in seconds, send to execution_success.",
             "", "| seed | route | " + " | ".join(keys) + " |", "|---" * (len(keys) + 2) + "|"]
    for seed, route, fig in rows:
        lines.append(f"| {seed} | {route} | " + " | ".join(f"{fig[k]:.2f}" for k in keys) + " |")
    lines += ["", "Mean over seeds:", "", "| route | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for route in ROUTES:
        figs = [fig for _, r, fig in rows if r == route]
        lines.append(f"| {route} | " + " | ".join(f"{statistics.mean(f[k] for f in figs):.2f}" for k in keys) + " |")
    wins = sum(1 for seed in range(1, args.seeds + 1)
               if [f for s, r, f in rows if s == seed and r == "pool"][0]["p95"]
               <= [f for s, r, f in rows if s == seed and r == "auto"][0]["p95"])
    lines += ["", f"Pool's p95 at or below auto's in {wins} of {args.seeds} sequences."]
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
