"""Scheduling overhead: from sending POST /prompt to the worker starting it (ComfyUI's execution_start).

Starts ``comfy-parallel serve`` with CPU workers and the test node pack, attaches a websocket client, and sends
prompts of a node that does nothing (CPSleep, 0 s) one at a time to idle workers, through each route. The
latency is execution_start's server timestamp minus the client's send time (same machine, same clock; ms
resolution). Writes bench/results/schedule_latency_cpu.md.

usage: .venv/bin/python bench/schedule_latency.py [--n 200] [--comfyui-version 0.3.75]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

import aiohttp  # noqa: E402
from harness import Server  # noqa: E402

from comfy_parallel.ops import provision  # noqa: E402


async def measure(server: Server, n: int) -> dict[str, list[float]]:
    client_id = uuid.uuid4().hex
    routes = {
        "header": (server.url + "/prompt", {"X-TARGET-GPU": "1"}),
        "entry port": (server.entry_url(2) + "/prompt", {}),
        "prefix": (server.url + "/gpu0/prompt", {}),
        "auto": (server.url + "/prompt", {}),
    }
    out: dict[str, list[float]] = {name: [] for name in routes}
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"{server.url}/ws?clientId={client_id}") as ws:
            for i in range(n):
                name = list(routes)[i % len(routes)]
                url, headers = routes[name]
                body = {"prompt": {"1": {"class_type": "CPSleep", "inputs": {"seconds": 0.0, "steps": 1,
                                                                              "tag": f"lat{i}"}}},
                        "client_id": client_id}
                sent = time.time()
                async with session.post(url, json=body, headers=headers) as resp:
                    prompt_id = (await resp.json())["prompt_id"]
                started = done = None
                while done is None:
                    msg = await ws.receive(timeout=30)
                    if msg.type != aiohttp.WSMsgType.TEXT:
                        continue
                    data = json.loads(msg.data)
                    if data.get("data", {}).get("prompt_id") != prompt_id:
                        continue
                    if data["type"] == "execution_start":
                        started = data["data"]["timestamp"] / 1000
                    elif data["type"] in ("execution_success", "execution_error"):
                        done = True
                if started is not None and i >= 8:  # the first few warm up imports and caches
                    out[name].append(1000 * (started - sent))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--comfyui-version", default=provision.DEFAULT_VERSION)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "schedule_latency_cpu.md"))
    args = ap.parse_args()
    server = Server(provision.ensure_comfyui(args.comfyui_version), devices="cpu,cpu,cpu",
                    name="schedule-latency").start()
    try:
        lat = asyncio.run(measure(server, args.n))
    finally:
        server.stop()
    rows = ["| route | prompts | p50 ms | p95 ms | max ms |", "|---|---|---|---|---|"]
    every: list[float] = []
    for name, values in lat.items():
        every += values
        q = statistics.quantiles(values, n=20)
        rows.append(f"| {name} | {len(values)} | {statistics.median(values):.1f} | {q[18]:.1f} | {max(values):.1f} |")
    q = statistics.quantiles(every, n=20)
    rows.append(f"| all | {len(every)} | {statistics.median(every):.1f} | {q[18]:.1f} | {max(every):.1f} |")
    text = (f"# Scheduling overhead, HTTP send -> execution_start ({time.strftime('%Y-%m-%d')})\n\n"
            f"Command: `.venv/bin/python bench/schedule_latency.py --n {args.n}` (ComfyUI {args.comfyui_version}, "
            f"3 CPU workers, one prompt at a time to an idle worker, websocket attached; {platform.node()}, "
            f"{platform.processor() or platform.machine()}). Includes ComfyUI's own prompt validation and the "
            "client's HTTP round trip; timestamps have 1 ms resolution.\n\n" + "\n".join(rows) + "\n")
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
