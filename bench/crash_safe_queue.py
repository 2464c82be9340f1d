"""The cost of the write-ahead queue, and how long a crashed server takes to come back with 1,000 queued prompts.

1. Accepted prompts per second at the load test's rate (tests/test_load.py: 1,000 CPSleep prompts of 0 s over every
   route, 8 requests in flight, 3 CPU workers): with the store (``synchronous=NORMAL``, the default, and ``FULL``)
   and without it (``--no-persist``). Each round runs every configuration once, each going first in turn (the
   machine's speed drifts); the median round counts.
2. The store's own cost per prompt, without a server: one ``accepted`` (a batch of one), ``started`` and
   ``finished`` (history entry) write, with ``synchronous=NORMAL`` and ``FULL``; the last two run on the worker
   thread between prompts, so ``FULL``'s fsyncs would add to every prompt's time on its device.
3. Crash to ``/ready``: 1,000 prompts queued (1 s each, so none finish), ``kill -9`` of the server that
   ``serve --supervise`` runs, then the time until ``/ready`` answers 200 again and how many prompts are queued.

Writes bench/results/crash_safe_queue_cpu.md and .json (the figures tests/results/reliability.md shows).

usage: .venv/bin/python bench/crash_safe_queue.py [--rounds 5] [--comfyui-version 0.3.75]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import statistics
import sys
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

import aiohttp  # noqa: E402
import psutil  # noqa: E402
from harness import ARTIFACTS, Server, prompt_id_for  # noqa: E402

from comfy_parallel import provision  # noqa: E402

N_PROMPTS = 1000
CONCURRENCY = 8  # tests/test_load.py's SUBMIT_CONCURRENCY
ROUTES = ("header", "port", "prefix", "auto")
CONFIGS = {
    "no store (--no-persist)": {"serve_args": ["--no-persist"], "env": {}},
    "store, synchronous=NORMAL (default)": {"serve_args": [], "env": {}},
    "store, synchronous=FULL": {"serve_args": [], "env": {"COMFY_PARALLEL_JOURNAL_SYNCHRONOUS": "FULL"}},
}


def _url(s: Server, i: int) -> tuple[str, dict[str, str]]:
    route, device = ROUTES[i % len(ROUTES)], i % s.n_devices
    if route == "header":
        return s.url + "/prompt", {"X-TARGET-GPU": str(device)}
    if route == "port":
        return s.entry_url(device) + "/prompt", {}
    if route == "prefix":
        return f"{s.url}/gpu{device}/prompt", {}
    return s.url + "/prompt", {}


async def submit_all(s: Server, n: int, seconds: float, run: str) -> float:
    """Send ``n`` prompts, ``CONCURRENCY`` at a time; return accepted prompts per second."""
    gate = asyncio.Semaphore(CONCURRENCY)
    async with aiohttp.ClientSession() as session:
        async def one(i: int) -> None:
            url, headers = _url(s, i)
            body = {"prompt": {"1": {"class_type": "CPSleep", "inputs": {"seconds": seconds, "steps": 1,
                                                                          "tag": f"{run}-{i}"}}},
                    "prompt_id": prompt_id_for(f"bench-{run}-{i}"), "client_id": f"bench-{run}"}
            async with gate:
                async with session.post(url, json=body, headers=headers) as resp:
                    assert resp.status == 200, await resp.text()

        started = time.monotonic()
        await asyncio.gather(*(one(i) for i in range(n)))
        return n / (time.monotonic() - started)


def throughput(comfy_dir: Path, rounds: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {name: [] for name in CONFIGS}
    servers = {}
    try:
        for name, config in CONFIGS.items():
            user = ARTIFACTS / f"bench-wal-user-{len(servers)}"
            shutil.rmtree(user, ignore_errors=True)
            user.mkdir(parents=True)
            servers[name] = Server(comfy_dir, serve_args=config["serve_args"], env=config["env"], user_dir=user,
                                   name=f"bench-wal-{len(servers)}").start()
        names = list(servers)
        for r in range(rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:  # each configuration goes first in turn
                s = servers[name]
                rate = asyncio.run(submit_all(s, N_PROMPTS, 0.0, f"{r}-{uuid.uuid4().hex[:6]}"))
                out[name].append(rate)
                s.wait_idle(timeout=120)
                print(f"round {r + 1}: {name}: {rate:.0f} accepted prompts/s", flush=True)
    finally:
        for s in servers.values():
            s.stop()
    return out


def store_cost(n: int = 2000) -> dict[str, dict[str, float]]:
    """Microseconds per write of the journal alone, per ``synchronous`` mode."""
    from comfy_parallel.journal import Journal

    entry = {"prompt": [0, "id", {"1": {"class_type": "CPSleep", "inputs": {}}}, {}, ["1"]],
             "outputs": {"1": {"record": [{"tag": "x" * 40, "start": 1.0, "end": 2.0}]}},
             "status": {"status_str": "success", "completed": True, "messages": [["execution_start", {}]] * 3},
             "meta": {"1": {"node_id": "1"}}, "gpu_id": 0}
    out = {}
    for mode in ("NORMAL", "FULL"):
        folder = ARTIFACTS / f"bench-wal-store-{mode}"
        shutil.rmtree(folder, ignore_errors=True)
        journal = Journal(folder / "queue.sqlite3", mode)
        items = [(i, str(uuid.uuid4()), entry["prompt"][2], {"client_id": "c"}, ["1"], {}) for i in range(n)]
        costs = {}
        writes = (("accepted", lambda it: journal.accepted(0, it)), ("started", lambda it: journal.started(it[1])),
                  ("finished", lambda it: journal.finished(it[1], entry)))
        for name, call in writes:
            started = time.perf_counter()
            for it in items:
                call(it)
            costs[name] = 1e6 * (time.perf_counter() - started) / n
        journal.close()
        out[mode] = costs
    return out


def crash_to_ready(comfy_dir: Path) -> dict[str, float]:
    user = ARTIFACTS / "bench-wal-crash-user"
    shutil.rmtree(user, ignore_errors=True)
    user.mkdir(parents=True)
    s = Server(comfy_dir, serve_args=["--supervise", "--drain-timeout", "0"], user_dir=user,
               name="bench-wal-crash").start()
    try:
        asyncio.run(submit_all(s, N_PROMPTS, 1.0, f"crash-{uuid.uuid4().hex[:6]}"))
        assert s.proc is not None
        child = psutil.Process(s.proc.pid).children()[0]
        killed = time.monotonic()
        os.kill(child.pid, signal.SIGKILL)
        up = None
        while up is None:
            kids = psutil.Process(s.proc.pid).children()
            try:
                if kids and kids[0].pid != child.pid and s.get("/ready").status == 200:
                    up = time.monotonic()
            except OSError:
                pass
            time.sleep(0.02)
        queue = s.get("/queue").json()
        return {"crash_to_ready_s": up - killed,
                "queued_after_restart": len(queue["queue_pending"]) + len(queue["queue_running"])}
    finally:
        s.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="rounds of 1,000 prompts per configuration")
    parser.add_argument("--comfyui-version", default=provision.DEFAULT_VERSION, choices=sorted(provision.RELEASES))
    args = parser.parse_args()
    comfy_dir = provision.ensure_comfyui(args.comfyui_version, quiet=True)
    rates = throughput(comfy_dir, args.rounds)
    costs = store_cost()
    crash = crash_to_ready(comfy_dir)
    base = statistics.median(rates["no store (--no-persist)"])
    lines = [
        f"# Write-ahead queue: cost and recovery ({time.strftime('%Y-%m-%d', time.gmtime())})", "",
        f"Command: `.venv/bin/python bench/crash_safe_queue.py --rounds {args.rounds} --comfyui-version "
        f"{args.comfyui_version}` (ComfyUI {args.comfyui_version}, 3 CPU workers; {platform.node() or 'host'}, "
        f"{platform.machine()}, {os.cpu_count()} cores).", "",
        f"Accepted prompts per second at the load test's rate ({N_PROMPTS:,} CPSleep 0 s prompts over every route, "
        f"{CONCURRENCY} requests in flight), median of {args.rounds} rounds (each configuration first in turn):", "",
        "| configuration | median prompts/s | min | max | vs no store |", "|---|---|---|---|---|",
    ]
    for name, values in rates.items():
        median = statistics.median(values)
        lines.append(f"| {name} | {median:.0f} | {min(values):.0f} | {max(values):.0f} | "
                     f"{100 * (median / base - 1):+.1f}% |")
    lines += ["", "The store alone, microseconds per write (2,000 prompts; `started` and `finished` run on the worker "
              "between prompts):", "", "| synchronous | accepted | started | finished |", "|---|---|---|---|"]
    lines += [f"| {mode} | {c['accepted']:.0f} | {c['started']:.0f} | {c['finished']:.0f} |"
              for mode, c in costs.items()]
    lines += ["", f"Crash to `/ready` with {N_PROMPTS:,} queued prompts (`kill -9` of the server under `serve "
              f"--supervise`): **{crash['crash_to_ready_s']:.1f} s**, {crash['queued_after_restart']:.0f} prompts "
              "queued again after the restart (the time is mostly the new process importing ComfyUI and torch)."]
    out = REPO / "bench" / "results" / "crash_safe_queue_cpu.md"
    out.write_text("\n".join(lines) + "\n")
    normal = statistics.median(rates["store, synchronous=NORMAL (default)"])
    full = statistics.median(rates["store, synchronous=FULL"])
    figures = {  # tests/reliability_results.py shows these in tests/results/reliability.md
        "command": f".venv/bin/python bench/crash_safe_queue.py --rounds {args.rounds} --comfyui-version "
                   f"{args.comfyui_version}", "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "accepted_per_s_no_store": round(base), "accepted_per_s_store_normal": round(normal),
        "accepted_per_s_store_full": round(full), "store_normal_vs_no_store_pct": round(100 * (normal / base - 1), 1),
        "store_full_vs_no_store_pct": round(100 * (full / base - 1), 1),
        "worker_writes_us_per_prompt_normal": round(costs["NORMAL"]["started"] + costs["NORMAL"]["finished"]),
        "worker_writes_us_per_prompt_full": round(costs["FULL"]["started"] + costs["FULL"]["finished"]),
        "crash_to_ready_s_1000_queued": round(crash["crash_to_ready_s"], 1),
        "queued_again_after_crash": int(crash["queued_after_restart"]),
    }
    out.with_suffix(".json").write_text(json.dumps(figures, indent=2) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
