"""How long the HTTP side waits while workers run Python: POST /prompt latency with every worker busy.

One process serves every device, so the event loop that answers HTTP shares the GIL with the workers. A worker
running Python (a sampling loop's launch code, a custom node) keeps the GIL until Python's switch interval (5 ms)
forces a switch, and every call that gives the GIL up (a socket read, an SQLite statement of the write-ahead
queue) then waits for it again behind the busy workers. This benchmark keeps three CPU workers busy with the test
pack's CPSpin node (Python that never gives the GIL up) and sends POST /prompt one at a time, measuring each
answer's latency at the client, with and without the write-ahead store and with Python's default switch interval
and 0.5 ms (``serve --switch-interval-ms 0.5``). Issue 15's store cost on a fast host is the same wait.

Writes bench/results/http_under_gil_load_cpu.md.

usage: .venv/bin/python bench/http_under_gil_load.py [--requests 100] [--comfyui-version 0.33.0]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from harness import Server  # noqa: E402

from comfy_parallel.ops import provision  # noqa: E402

CONFIGS = {  # server -> serve arguments
    "no store, switch 5 ms (Python's default)": ["--no-persist"],
    "store, switch 5 ms (Python's default)": [],
    "no store, switch 0.5 ms": ["--no-persist", "--switch-interval-ms", "0.5"],
    "store, switch 0.5 ms": ["--switch-interval-ms", "0.5"],
}


def measure(s: Server, requests: int, busy_s: float, idle: bool) -> list[float]:
    """POST /prompt latencies (seconds); unless ``idle``, every worker runs CPSpin all along."""
    if not idle:
        per_device = int(requests * 0.1 / busy_s) + 4  # outlasts the requests; the rest is cleared after
        for device in range(s.n_devices):
            for i in range(per_device):
                s.submit({"1": {"class_type": "CPSpin", "inputs": {"seconds": busy_s, "tag": f"spin-{device}-{i}"}}},
                         headers={"X-TARGET-GPU": str(device)})
        deadline = time.time() + 30
        while len(s.get("/queue").json()["queue_running"]) < s.n_devices:
            assert time.time() < deadline, "workers did not start spinning"
            time.sleep(0.01)
    out = []
    for i in range(requests):
        started = time.perf_counter()
        s.submit({"1": {"class_type": "CPSleep", "inputs": {"seconds": 0.0, "steps": 1, "tag": f"probe-{i}"}}},
                 headers={"X-TARGET-GPU": "0"})
        out.append(time.perf_counter() - started)
    s.post("/queue", {"clear": True})
    s.post("/interrupt", {})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=100)
    ap.add_argument("--busy-s", type=float, default=0.5, help="seconds of each CPSpin prompt")
    ap.add_argument("--comfyui-version", default="0.33.0", choices=sorted(provision.RELEASES))
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "http_under_gil_load_cpu.md")
    args = ap.parse_args()
    comfy = provision.ensure_comfyui(args.comfyui_version, quiet=True)
    rows = []
    for name, serve_args in CONFIGS.items():
        s = Server(comfy, serve_args=serve_args, name="gil-load").start()
        try:
            for idle in (True, False):
                lat = measure(s, args.requests, args.busy_s, idle)
                rows.append((name, "idle" if idle else "3 workers spinning", lat))
                print(name, "idle" if idle else "busy", f"p50 {statistics.median(lat) * 1e3:.1f} ms", flush=True)
                s.wait_idle(timeout=120)
        finally:
            s.stop()
    lines = [f"# POST /prompt latency while workers hold the GIL ({time.strftime('%Y-%m-%d', time.gmtime())})", "",
             f"Command: `.venv/bin/python {' '.join(sys.argv)}` (ComfyUI {args.comfyui_version}, 3 CPU workers; "
             f"{platform.node() or 'host'}, {platform.machine()}, {os.cpu_count()} cores). {args.requests} requests "
             f"one at a time, each a prompt queued on device 0; 'spinning': every worker runs CPSpin prompts of "
             f"{args.busy_s} s (Python that keeps the GIL) all along. Milliseconds, at the client.", "",
             "| server | workers | p50 | p90 | max |", "|---|---|---|---|---|"]
    for name, state, lat in rows:
        v = sorted(x * 1e3 for x in lat)
        lines.append(f"| {name} | {state} | {statistics.median(v):.1f} | {v[int(0.9 * (len(v) - 1))]:.1f} | "
                     f"{v[-1]:.1f} |")
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
