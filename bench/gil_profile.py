"""Where a server's GIL time goes during the accept phase, with and without the write-ahead store.

py-spy (``pip install py-spy``; it reads the server's memory, so it needs ptrace rights) samples only the thread
holding the GIL (``--gil``) for ``--seconds`` inside a 5,000-prompt submission of ``crash_safe_queue.submit_all``;
the samples per prompt (GIL-held microseconds) are split by thread (event loop, workers, journal thread) and by
whether the stack passes through ``comfy_parallel/durability`` (the store's own code), and the functions whose
GIL time grew most with the store are listed.

usage: .venv/bin/python bench/gil_profile.py [--reps 3] [--py-spy PATH] [--out bench/results/gil_profile_cpu.md]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import re
import shutil
import sys
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "tests"), str(REPO), str(REPO / "bench")]

from crash_safe_queue import submit_all  # noqa: E402
from harness import ARTIFACTS, Server  # noqa: E402

from comfy_parallel.ops import provision  # noqa: E402

CONFIGS = {"no store": ["--no-persist"], "store": []}
RATE_HZ = 400
PROMPTS = 5000


async def profiled_round(s: Server, py_spy: str, seconds: float, out: Path, tag: str) -> float:
    """Accepted prompts per second of one submission, sampled from 0.5 s after it starts."""
    submission = asyncio.create_task(submit_all(s, PROMPTS, 0.0, tag))
    await asyncio.sleep(0.5)
    spy = await asyncio.create_subprocess_exec(
        py_spy, "record", "--gil", "--threads", "--nonblocking", "-r", str(RATE_HZ), "-f", "raw", "-d",
        str(int(seconds)), "-o", str(out), "-p", str(s.proc.pid),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    rate = await submission
    if await spy.wait() != 0 or not out.exists():
        raise SystemExit(f"py-spy failed on {s.name} (installed, and allowed to ptrace?)")
    return rate


def tally(files: list[Path], prompts: float) -> tuple[dict, dict, float]:
    """GIL-held microseconds per prompt by (thread, part) and by (thread, function), and in all."""
    parts: collections.Counter = collections.Counter()
    functions: collections.Counter = collections.Counter()
    for path in files:
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            stack, count = line.rsplit(" ", 1)
            frames = stack.split(";")
            thread, frames = frames[0], [re.sub(r":\d+\)", ")", f) for f in frames[1:]]
            kind = ("event loop" if "MainThread" in thread else "workers" if "worker" in thread
                    else "journal thread" if "journal" in thread else "other threads")
            parts[(kind, "store" if any("durability" in f for f in frames) else "rest")] += int(count)
            for f in set(frames):
                functions[(kind, f)] += int(count)
    us = 1e6 / RATE_HZ / prompts
    return ({k: v * us for k, v in parts.items()}, {k: v * us for k, v in functions.items()},
            sum(parts.values()) * us)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=4)
    parser.add_argument("--py-spy", default=shutil.which("py-spy") or "py-spy")
    parser.add_argument("--comfyui-version", default=provision.DEFAULT_VERSION, choices=sorted(provision.RELEASES))
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "gil_profile_cpu.md")
    args = parser.parse_args()
    comfy = provision.ensure_comfyui(args.comfyui_version, quiet=True)
    work = ARTIFACTS / "gil-profile"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    servers = {}
    samples: dict[str, list[Path]] = {name: [] for name in CONFIGS}
    prompts: dict[str, float] = {name: 0.0 for name in CONFIGS}
    rates: dict[str, list[float]] = {name: [] for name in CONFIGS}
    try:
        for i, (name, serve_args) in enumerate(CONFIGS.items()):
            user = work / f"user-{i}"
            user.mkdir()
            servers[name] = Server(comfy, serve_args=serve_args, user_dir=user, name=f"gil-profile-{i}").start()
        for s in servers.values():
            asyncio.run(submit_all(s, 1000, 0.0, f"warm-{uuid.uuid4().hex[:6]}"))
            s.wait_idle(timeout=120)
        for rep in range(args.reps):
            for name, s in servers.items():
                out = work / f"{name.replace(' ', '_')}-{rep}.txt"
                rate = asyncio.run(profiled_round(s, args.py_spy, args.seconds, out, f"{rep}-{uuid.uuid4().hex[:6]}"))
                s.wait_idle(timeout=300)
                samples[name].append(out)
                prompts[name] += rate * args.seconds
                rates[name].append(rate)
                print(f"{name} {rep + 1}: {rate:.0f} prompts/s", flush=True)
    finally:
        for s in servers.values():
            s.stop()
    (base_parts, base_funcs, base_total), (parts, funcs, total) = (tally(samples[n], prompts[n]) for n in CONFIGS)
    lines = [f"# GIL time per accepted prompt, with and without the store ({time.strftime('%Y-%m-%d', time.gmtime())})",
             "", f"Command: `.venv/bin/python {' '.join(sys.argv)}` (ComfyUI {args.comfyui_version}, 3 CPU workers, "
             f"{os.cpu_count()} cores; py-spy --gil at {RATE_HZ} Hz for {args.seconds:g} s inside each of "
             f"{args.reps} submissions of {PROMPTS:,} prompts per server). Accepted prompts per second: "
             + "; ".join(f"{n} {', '.join(f'{r:.0f}' for r in rates[n])}" for n in CONFIGS) + ".", "",
             "| thread | part | no store (us/prompt) | store | change |", "|---|---|---|---|---|"]
    for key in sorted(set(base_parts) | set(parts), key=lambda k: -parts.get(k, 0)):
        lines.append(f"| {key[0]} | {key[1]} | {base_parts.get(key, 0):.1f} | {parts.get(key, 0):.1f} | "
                     f"{parts.get(key, 0) - base_parts.get(key, 0):+.1f} |")
    lines.append(f"| all | | {base_total:.0f} | {total:.0f} | {total - base_total:+.0f} |")
    lines += ["", "The store's own functions (inclusive GIL-held us per prompt):", "",
              "| thread | function | us/prompt |", "|---|---|---|"]
    own = sorted(((k, v) for k, v in funcs.items() if "durability" in k[1]), key=lambda kv: -kv[1])
    lines += [f"| {k[0]} | `{k[1]}` | {v:.1f} |" for k, v in own[:15]]
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
