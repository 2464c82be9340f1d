"""Garbage collections that hold the GIL in a loaded server: per 1,000-prompt round, every collection by
generation (gc.callbacks, ``bench/gc_callbacks/``), with the workers' periodic full collection shared (the
``gc-once-per-interval`` patch, default) and per worker (``bench/store_variants/gc_per_worker``, as before it).

Each round sends the write-ahead queue benchmark's load (``crash_safe_queue.submit_all``) to one server, then the
other, and waits for their counters to be written (once a second) before and after.

usage: .venv/bin/python bench/gc_pauses.py [--rounds 8] [--out bench/results/gc_pauses_cpu.md]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "tests"), str(REPO), str(REPO / "bench")]

from crash_safe_queue import submit_all  # noqa: E402
from harness import ARTIFACTS, Server  # noqa: E402

from comfy_parallel.ops import provision  # noqa: E402

PER_WORKER = REPO / "bench" / "store_variants" / "gc_per_worker" / "sitecustomize.py"
SITES = {"shared (gc-once-per-interval)": "", "per worker (as before)": str(PER_WORKER)}  # run after gc_callbacks


def totals(path: Path, after: float) -> dict:
    """The counters written after ``after`` (the writer renames a whole file into place once a second)."""
    while not path.exists() or path.stat().st_mtime <= after:
        time.sleep(0.1)
    return json.loads(path.read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--comfyui-version", default=provision.DEFAULT_VERSION, choices=sorted(provision.RELEASES))
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "gc_pauses_cpu.md")
    args = parser.parse_args()
    comfy = provision.ensure_comfyui(args.comfyui_version, quiet=True)
    servers: dict[str, tuple[Server, Path]] = {}
    rows: dict[str, list[tuple[float, dict, float]]] = {name: [] for name in SITES}
    try:
        for i, (name, site) in enumerate(SITES.items()):
            user = ARTIFACTS / f"gc-pauses-user-{i}"
            shutil.rmtree(user, ignore_errors=True)
            user.mkdir(parents=True)
            out = user / "gc.json"
            env = {"PYTHONPATH": str(REPO / "bench" / "gc_callbacks"), "GC_PAUSES_OUT": str(out),
                   "GC_PAUSES_ALSO": site}
            servers[name] = (Server(comfy, env=env, user_dir=user, name=f"gc-pauses-{i}").start(), out)
        for s, _ in servers.values():
            asyncio.run(submit_all(s, 1000, 0.0, f"warm-{uuid.uuid4().hex[:6]}"))
            s.wait_idle(timeout=120)
        for r in range(args.rounds):
            for name, (s, out) in servers.items():
                before = totals(out, time.time())
                started = time.monotonic()
                rate = asyncio.run(submit_all(s, 1000, 0.0, f"{r}-{uuid.uuid4().hex[:6]}"))
                s.wait_idle(timeout=120)
                wall = time.monotonic() - started
                after = totals(out, time.time())
                delta = {g: [after[g][0] - before[g][0], after[g][1] - before[g][1]] for g in after}
                rows[name].append((rate, delta, wall))
                print(f"round {r + 1}: {name}: {rate:.0f} prompts/s, full collections {delta['2'][0]} "
                      f"({delta['2'][1] * 1000:.0f} ms)", flush=True)
    finally:
        for s, _ in servers.values():
            s.stop()
    lines = [f"# Garbage collections under load ({time.strftime('%Y-%m-%d', time.gmtime())})", "",
             f"Command: `.venv/bin/python {' '.join(sys.argv)}` (ComfyUI {args.comfyui_version}, 3 CPU workers, "
             f"{os.cpu_count()} cores). Per round: 1,000 prompts as `bench/crash_safe_queue.py` sends them, until "
             "the server is idle; mean over rounds.", "",
             "| workers' periodic collection | rounds | full collections per round | ms each | young (gen 0-1) "
             "per round | ms | median prompts/s | rounds with a full collection: median prompts/s | without |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, per_round in rows.items():
        full = [d["2"] for _, d, _ in per_round]
        young_n = statistics.mean(d["0"][0] + d["1"][0] for _, d, _ in per_round)
        young_ms = statistics.mean(d["0"][1] + d["1"][1] for _, d, _ in per_round) * 1000
        n_full = sum(n for n, _ in full)
        each = sum(s for _, s in full) / n_full * 1000 if n_full else 0.0
        hit = [rate for rate, d, _ in per_round if d["2"][0]]
        clear = [rate for rate, d, _ in per_round if not d["2"][0]]
        hit_s = f"{statistics.median(hit):.0f} ({len(hit)})" if hit else "-"
        clear_s = f"{statistics.median(clear):.0f} ({len(clear)})" if clear else "-"
        lines.append(f"| {name} | {len(per_round)} | {n_full / len(per_round):.2f} | {each:.0f} | {young_n:.0f} | "
                     f"{young_ms:.0f} | {statistics.median(r for r, _, _ in per_round):.0f} | {hit_s} | {clear_s} |")
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
