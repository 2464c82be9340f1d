"""The cost of the write-ahead queue, and how long a crashed server takes to come back with 1,000 queued prompts.

1. Accepted prompts per second at the load test's rate (tests/test_load.py: 1,000 CPSleep prompts of 0 s over every
   route, 8 requests in flight, 3 CPU workers): with the store (``synchronous=NORMAL``, the default, and ``FULL``)
   and without it (``--no-persist``). Every server first gets one unmeasured round (its first round after a start
   is slow for all of them). Each round then runs every configuration once, back to back, each going first in
   turn; a configuration's cost is the median over rounds of its rate divided by the no-store rate of the same
   round (on a shared machine the speed drifts between rounds more than the store costs), and the median rates
   are shown beside it. A round in which the machine's other processes took more than ``--other-load`` cores is
   run again (after waiting up to ``--wait-quiet`` seconds for them to quieten). Before each server's round its
   workers run ComfyUI's full garbage collection (``/free``), so that none lands inside the round: the store's cost
   is measured apart from the collections, which cost every server the same per second (their count and seconds
   per round are in the results, a collection that still lands in a round included).
2. The store's own cost per prompt, without a server: one ``accepted`` (a batch of one), ``started`` and
   ``finished`` (history entry) write, with ``synchronous=NORMAL`` and ``FULL``; the last two run on the worker
   thread between prompts, so ``FULL``'s fsyncs would add to every prompt's time on its device.
3. Crash to ``/ready``: 1,000 prompts queued (1 s each, so none finish), ``kill -9`` of the server that
   ``serve --supervise`` runs, then the time until ``/ready`` answers 200 again and how many prompts are queued.

Writes bench/results/crash_safe_queue_cpu.md and .json (the figures tests/results/reliability.md shows).

usage: .venv/bin/python bench/crash_safe_queue.py [--rounds 12] [--comfyui-version 0.3.75]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
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
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from harness import ARTIFACTS, Server, prompt_id_for  # noqa: E402

from comfy_parallel.comfy_adapter.loader import read_version  # noqa: E402
from comfy_parallel.ops import provision  # noqa: E402

N_PROMPTS = 1000
CONCURRENCY = 8  # tests/test_load.py's SUBMIT_CONCURRENCY
ROUTES = ("header", "port", "prefix", "auto")
NORMAL = "store, synchronous=NORMAL (default)"
FULL = "store, synchronous=FULL"
CONFIGS = {
    "no store (--no-persist)": {"serve_args": ["--no-persist"], "env": {}},
    NORMAL: {"serve_args": [], "env": {}},
    FULL: {"serve_args": [], "env": {"COMFY_PARALLEL_JOURNAL_SYNCHRONOUS": "FULL"}},
}


VARIANTS = REPO / "bench" / "store_variants"  # --variant NAME: a sitecustomize.py run in the server (README there)


def add_variant(name: str) -> None:
    """Servers that run ``store_variants/NAME/sitecustomize.py``: with the store, and for a switch-interval change
    also without it (that changes every thread, not only the store's)."""
    folder = VARIANTS / name
    if not (folder / "sitecustomize.py").is_file():
        raise SystemExit(f"--variant {name}: no {folder / 'sitecustomize.py'}; variants: "
                         f"{', '.join(sorted(p.name for p in VARIANTS.iterdir() if p.is_dir()))}")
    env = {"PYTHONPATH": os.pathsep.join(p for p in (str(folder), os.environ.get("PYTHONPATH", "")) if p)}
    if name.startswith("switch"):
        CONFIGS[f"no store + {name}"] = {"serve_args": ["--no-persist"], "env": env}
    CONFIGS[f"store + {name}"] = {"serve_args": [], "env": env}


COMFY_ARGS: list[str] = []  # --comfy-arg: more ComfyUI arguments for every server (the device's --front-end-root)


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


class OtherLoad:
    """CPU time that processes outside this benchmark (other users of a shared machine) take, in cores.

    The rate at 8 requests in flight is set by latency, so another process's burst of CPU changes it by more than
    the store does. A round counts only if the other processes stayed under ``limit`` cores through all of it.
    """

    def __init__(self, limit: float) -> None:
        self.limit = limit
        self.me = psutil.Process()

    def _own_s(self) -> float:
        total = 0.0
        for p in [self.me, *self.me.children(recursive=True)]:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
        return total

    def _busy_s(self) -> float:
        t = psutil.cpu_times()
        return t.user + t.nice + t.system + t.irq + t.softirq + getattr(t, "steal", 0.0)

    def mark(self) -> tuple[float, float, float]:
        return time.monotonic(), self._busy_s(), self._own_s()

    def since(self, mark: tuple[float, float, float]) -> float:
        """Cores the other processes used since ``mark`` (the machine's busy time less this benchmark's)."""
        now, busy, own = self.mark()
        return max(0.0, (busy - mark[1]) - (own - mark[2])) / max(1e-3, now - mark[0])

    def wait_quiet(self, timeout: float) -> float:
        """Wait (1 s windows) until the other processes use less than ``limit``; return their last load."""
        deadline = time.monotonic() + timeout
        while True:
            mark = self.mark()
            time.sleep(1.0)
            load = self.since(mark)
            if load < self.limit or time.monotonic() > deadline:
                return load


THREAD_CPU: dict[str, list[list[float]]] = {}  # per configuration, per counted round: _cpu_since's figures


GC: dict[str, list[list[float]]] = {}  # per configuration, per counted round: full collections run, their seconds


def _gc(s: Server) -> tuple[float, float]:
    """The workers' full garbage collections so far and their seconds (``/metrics``; each holds the GIL)."""
    runs = seconds = 0.0
    for family in text_string_to_metric_families(s.get("/metrics").body.decode()):
        for sample in family.samples:
            if sample.name == "comfy_parallel_gc_collections_total" and sample.labels.get("result") == "run":
                runs = sample.value
            elif sample.name == "comfy_parallel_gc_seconds_total":
                seconds = sample.value
    return runs, seconds


def _collect_now(s: Server, timeout: float = 60) -> tuple[float, float]:
    """Have every worker of ``s`` run its full garbage collection now (``/free``), so that none runs in the round
    that follows: ComfyUI's next one is 10 s away. Each holds the GIL for a third of a second on the VM; one that
    lands in a 1,000-prompt round halves that round's rate, whichever server it is, and with rounds lasting about
    as long as the collection interval, the rotation of configurations kept landing them in the same slots.
    Returns ``_gc(s)`` once they have."""
    runs = _gc(s)[0]
    assert s.post("/free", {"unload_models": True, "free_memory": True}).status == 200
    deadline = time.monotonic() + timeout
    while (now := _gc(s))[0] < runs + s.n_devices:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{s.name}: the workers did not collect after /free")
        time.sleep(0.05)
    return now


def _thread_cpu(s: Server) -> dict[int, float]:
    """CPU seconds so far of each thread of the server process (by thread id)."""
    return {t.id: t.user_time + t.system_time for t in psutil.Process(s.proc.pid).threads()}


def _cpu_since(before: dict[int, float], after: dict[int, float]) -> list[float]:
    """The process's CPU seconds between two samples, then its busiest threads' (largest first): which threads a
    configuration makes busier (the event loop, the workers, the journal thread)."""
    deltas = sorted((after[tid] - before.get(tid, 0.0) for tid in after), reverse=True)
    return [sum(deltas), *deltas[:6]]


def throughput(comfy_dir: Path, rounds: int, other: OtherLoad, wait_s: float,
               budget_s: float | None = None) -> tuple[dict[str, list[float]], int]:
    """Accepted prompts per second of each configuration, one figure per round (rounds in the same order), and how
    many rounds were run again because other processes took more than ``other.limit`` cores during them. With
    ``budget_s``, no round starts after that many seconds (a device call has a time limit)."""
    deadline = time.monotonic() + budget_s if budget_s else float("inf")
    out: dict[str, list[float]] = {name: [] for name in CONFIGS}
    servers = {}
    repeated = 0
    try:
        for name, config in CONFIGS.items():
            user = ARTIFACTS / f"bench-wal-user-{len(servers)}"
            shutil.rmtree(user, ignore_errors=True)
            user.mkdir(parents=True)
            servers[name] = Server(comfy_dir, serve_args=config["serve_args"], env=config["env"], user_dir=user,
                                   extra_args=COMFY_ARGS, name=f"bench-wal-{len(servers)}").start()
        for name, s in servers.items():
            rate = asyncio.run(submit_all(s, N_PROMPTS, 0.0, f"warm-{uuid.uuid4().hex[:6]}"))
            s.wait_idle(timeout=120)
            print(f"warm-up: {name}: {rate:.0f} accepted prompts/s (not counted)", flush=True)
        names = list(servers)
        r = 0
        while r < rounds:
            if time.monotonic() > deadline:
                print(f"budget spent: {r} of {rounds} rounds run", flush=True)
                break
            other.wait_quiet(wait_s)
            got: dict[str, float] = {}
            worst = 0.0
            cpu: dict[str, list[float]] = {}
            gcs: dict[str, list[float]] = {}
            for name in names[r % len(names):] + names[:r % len(names)]:  # each configuration goes first in turn
                s = servers[name]
                gc_before = _collect_now(s)
                before = _thread_cpu(s)
                mark = other.mark()
                got[name] = asyncio.run(submit_all(s, N_PROMPTS, 0.0, f"{r}-{uuid.uuid4().hex[:6]}"))
                worst = max(worst, other.since(mark))
                s.wait_idle(timeout=120)
                cpu[name] = _cpu_since(before, _thread_cpu(s))
                gcs[name] = [b - a for a, b in zip(gc_before, _gc(s))]
            rates = ", ".join(f"{name}: {rate:.0f}" for name, rate in got.items())
            if worst >= other.limit and repeated < 4 * rounds:
                repeated += 1
                print(f"round {r + 1} not counted (other processes took {worst:.2f} cores): {rates}", flush=True)
                continue
            for name, rate in got.items():
                out[name].append(rate)
                THREAD_CPU.setdefault(name, []).append(cpu[name])
                GC.setdefault(name, []).append(gcs[name])
            print(f"round {r + 1} (other processes {worst:.2f} cores): {rates} accepted prompts/s", flush=True)
            r += 1
    finally:
        for s in servers.values():
            s.stop()
    return out, repeated


def paired_change(rates: dict[str, list[float]], name: str, base: str) -> float:
    """Median over rounds of ``name``'s rate relative to ``base``'s in the same round, in percent."""
    return 100 * (statistics.median(a / b for a, b in zip(rates[name], rates[base])) - 1)


def paired_interval(rates: dict[str, list[float]], name: str, base: str, level: float = 0.90,
                    resamples: int = 4000) -> tuple[float, float]:
    """Bootstrap interval (rounds resampled, fixed seed) of ``paired_change``, in percent."""
    ratios = [a / b for a, b in zip(rates[name], rates[base])]
    draw = random.Random(0)
    medians = sorted(statistics.median(draw.choices(ratios, k=len(ratios))) for _ in range(resamples))
    tail = int(resamples * (1 - level) / 2)
    return 100 * (medians[tail] - 1), 100 * (medians[-tail - 1] - 1)


def mean_ratio(rates: dict[str, list[float]], name: str, base: str) -> float:
    return statistics.mean(rates[name]) / statistics.mean(rates[base])


def store_cost(n: int = 2000) -> dict[str, dict[str, float]]:
    """Microseconds per write of the journal alone, per ``synchronous`` mode."""
    from comfy_parallel.durability.journal import Journal

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
        writes = (("accepted", lambda it: journal.accepted("0", it)),
                  ("started", lambda it: journal.started(it[1], 0)),
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
               extra_args=COMFY_ARGS, name="bench-wal-crash").start()
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
    parser.add_argument("--rounds", type=int, default=12, help="rounds of 1,000 prompts per configuration")
    parser.add_argument("--other-load", type=float, default=0.15, metavar="CORES",
                        help="a round counts only while other processes use less CPU than this (a shared machine)")
    parser.add_argument("--wait-quiet", type=float, default=120, metavar="S",
                        help="how long to wait for other processes to quieten before each round")
    parser.add_argument("--comfyui-version", default=provision.DEFAULT_VERSION, choices=sorted(provision.RELEASES))
    parser.add_argument("--comfyui", type=Path, metavar="DIR",
                        help="this ComfyUI folder instead of the provisioned --comfyui-version (the device machine)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results", metavar="DIR")
    parser.add_argument("--budget-s", type=float, default=None, metavar="S",
                        help="start no throughput round after S seconds (the table then says how many ran)")
    parser.add_argument("--comfy-arg", dest="comfy_args", action="append", default=[], metavar="ARG",
                        help="one more ComfyUI argument for every server, e.g. --comfy-arg=--front-end-root=DIR")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME",
                        help="also servers changed by bench/store_variants/NAME (repeatable)")
    parser.add_argument("--skip-full", action="store_true", help="leave out the synchronous=FULL server")
    parser.add_argument("--skip-crash", action="store_true", help="leave out the crash-to-/ready measurement")
    parser.add_argument("--label", default="cpu", help="results go to DIR/crash_safe_queue_LABEL.{md,json}")
    args = parser.parse_args()
    COMFY_ARGS[:] = args.comfy_args
    if args.skip_full:
        del CONFIGS[FULL]
    for name in args.variant:
        add_variant(name)
    comfy_dir = args.comfyui.resolve() if args.comfyui else provision.ensure_comfyui(args.comfyui_version, quiet=True)
    version = read_version(comfy_dir) if args.comfyui else args.comfyui_version
    rates, repeated = throughput(comfy_dir, args.rounds, OtherLoad(args.other_load), args.wait_quiet,
                                 args.budget_s)
    ran = len(rates[next(iter(rates))])
    costs = store_cost()
    crash = None if args.skip_crash else crash_to_ready(comfy_dir)
    base_name = "no store (--no-persist)"
    command = " ".join(["python" if args.comfyui else ".venv/bin/python", *sys.argv])
    base = statistics.median(rates[base_name])
    lines = [
        f"# Write-ahead queue: cost and recovery ({time.strftime('%Y-%m-%d', time.gmtime())})", "",
        f"Command: `{command}` (ComfyUI {version}, 3 CPU workers; {platform.node() or 'host'}, "
        f"{platform.machine()}, {os.cpu_count()} cores).", "",
        f"Accepted prompts per second at the load test's rate ({N_PROMPTS:,} CPSleep 0 s prompts over every route, "
        f"{CONCURRENCY} requests in flight), {ran} rounds after one unmeasured round per server; in each "
        "round every configuration runs once, back to back, each first in turn. `vs no store`: the median over "
        "rounds of the rate divided by the no-store rate of the same round. A round counts only if the machine's "
        f"other processes used less than {args.other_load:.2f} cores all through it ({repeated} rounds were run "
        "again).", "",
        "| configuration | vs no store | 90% interval | ratio of mean rates | median prompts/s | min | max |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, values in rates.items():
        low, high = paired_interval(rates, name, base_name)
        lines.append(f"| {name} | {paired_change(rates, name, base_name):+.1f}% | {low:+.1f}% to {high:+.1f}% | "
                     f"{mean_ratio(rates, name, base_name):.3f} | {statistics.median(values):.0f} | "
                     f"{min(values):.0f} | {max(values):.0f} |")
    lines += ["", "`90% interval`: bootstrap over rounds of the median of per-round ratios. Per-round rates: "
              f"`crash_safe_queue_{args.label}_rounds.json`.",
              "", f"CPU seconds of the server process per {N_PROMPTS:,} prompts (from the first request until the "
              "server is idle; median over rounds), in all and its six busiest threads, busiest first (the event "
              "loop and the three workers lead; the journal thread is in the store's columns):", "",
              "| configuration | process | 1st | 2nd | 3rd | 4th | 5th | 6th |", "|---|---|---|---|---|---|---|---|"]
    for name, per_round in THREAD_CPU.items():
        columns = [statistics.median(r[i] for r in per_round if len(r) > i) for i in range(len(per_round[0]))]
        lines.append(f"| {name} | " + " | ".join(f"{c:.3f}" for c in columns) + " |")
    lines += ["", "Full garbage collections of ComfyUI's worker loop (`/metrics`; each holds the GIL, so requests "
              "wait): rounds with at least one, and their mean number and seconds per round (from the first request "
              "until the server is idle):", "", "| configuration | rounds with one | per round | seconds per round |",
              "|---|---|---|---|"]
    for name, per_round in GC.items():
        runs, secs = statistics.mean(r[0] for r in per_round), statistics.mean(r[1] for r in per_round)
        hit = sum(1 for r in per_round if r[0] > 0)
        lines.append(f"| {name} | {hit} of {len(per_round)} | {runs:.2f} | {secs:.3f} |")
    lines += ["", "The store's SQLite writes alone, microseconds per write (2,000 prompts; with `NORMAL` the journal "
              "writer's thread makes them, in batches, off every request's and worker's path; with `FULL` a worker "
              "makes `started` and `finished` itself, between prompts):", "",
              "| synchronous | accepted | started | finished |", "|---|---|---|---|"]
    lines += [f"| {mode} | {c['accepted']:.0f} | {c['started']:.0f} | {c['finished']:.0f} |"
              for mode, c in costs.items()]
    if crash is not None:
        lines += ["", f"Crash to `/ready` with {N_PROMPTS:,} queued prompts (`kill -9` of the server under `serve "
                  f"--supervise`): **{crash['crash_to_ready_s']:.1f} s**, {crash['queued_after_restart']:.0f} "
                  "prompts queued again after the restart (the time is mostly the new process importing ComfyUI "
                  "and torch)."]
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"crash_safe_queue_{args.label}.md"
    out.write_text("\n".join(lines) + "\n")
    normal = statistics.median(rates[NORMAL])
    figures = {  # tests/reliability_results.py shows these in tests/results/reliability.md
        "command": command, "date": time.strftime("%Y-%m-%d", time.gmtime()), "rounds_run_again": repeated,
        "accepted_per_s_no_store": round(base), "accepted_per_s_store_normal": round(normal),
        "store_normal_vs_no_store_pct": round(paired_change(rates, NORMAL, base_name), 1),
        "store_normal_vs_no_store_90pct_interval": [round(x, 1) for x in paired_interval(rates, NORMAL, base_name)],
        "store_normal_ratio_of_mean_rates": round(mean_ratio(rates, NORMAL, base_name), 3),
        "sqlite_start_and_finish_us_per_prompt_normal": round(costs["NORMAL"]["started"] + costs["NORMAL"]["finished"]),
        "sqlite_start_and_finish_us_per_prompt_full": round(costs["FULL"]["started"] + costs["FULL"]["finished"]),
    }
    if crash is not None:
        figures["crash_to_ready_s_1000_queued"] = round(crash["crash_to_ready_s"], 1)
        figures["queued_again_after_crash"] = int(crash["queued_after_restart"])
    if FULL in rates:
        figures["accepted_per_s_store_full"] = round(statistics.median(rates[FULL]))
        figures["store_full_vs_no_store_pct"] = round(paired_change(rates, FULL, base_name), 1)
    for name in rates:
        if " + " in name:  # a --variant server
            figures[f"{name} vs no store pct"] = round(paired_change(rates, name, base_name), 1)
    out.with_suffix(".json").write_text(json.dumps(figures, indent=2) + "\n")
    (args.out / f"crash_safe_queue_{args.label}_rounds.json").write_text(
        json.dumps({"rates": rates, "thread_cpu_s": THREAD_CPU, "gc_runs_and_s": GC}, indent=1) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
