"""Shared weights, host memory: stock ComfyUI vs comfy-parallel with two workers running the same checkpoint.

Each scenario starts one server (never two at once), runs its prompts over HTTP, then reads the server's VmRSS
(and VmHWM, the peak) from /proc and, for comfy-parallel, the ``weights`` section of /multigpu/status.

  stock            python main.py; the checkpoint runs once
  parallel         comfy-parallel serve, 2 workers (2 GPUs, or --devices 0*2 on a one-GPU machine); each runs it
  parallel-unshared  the same with --shared-weights off (each worker's executor loads its own copy: "today")
  parallel-ram0    the same with --weights-ram-limit 0 (no host copy kept once the devices have theirs)
  parallel-pagecache  the same with --host-copy page-cache (the host copy is the file's page cache)
  *-novram         the same with --novram (every weight offloaded, read from the host copy at each use), both
                   workers alternating two checkpoints

usage (device machine, PYTHONPATH with the repo and the carried wheels):
    python3 bench/shared_weights.py --comfyui /tmp/comfyui --ckpt sdxl_rand.safetensors \
        --ckpt2 sd15_rand.safetensors --devices 0*2 --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_check import REPO, gpu_memory_used, http, proc_status_kib, submit, wait_all, workflow  # noqa: E402


def run(name: str, cmd: list[str], port: int, rounds: list[list[tuple[str, int | None]]], args: argparse.Namespace,
        out: Path) -> dict:
    """Start ``cmd``; for each round submit every (checkpoint, target) at once and wait; then measure."""
    log_path = out / f"sw_{name}.log"
    res: dict = {"scenario": name, "cmd": " ".join(cmd)}
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=str(REPO),
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        deadline = time.monotonic() + args.start_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"exited with {proc.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError("did not start")
            try:
                http(port, "/system_stats", timeout=5)
                break
            except (OSError, urllib.error.URLError, ValueError):
                time.sleep(0.5)
        res["rss_idle_gib"] = round((proc_status_kib(proc.pid, "VmRSS") or 0) / 2**20, 3)
        t0 = time.monotonic()
        for i, jobs in enumerate(rounds):
            ids = {}
            for ckpt, target in jobs:
                headers = {"X-TARGET-GPU": str(target)} if target is not None else None
                prompt_id, sent, _ = submit(port, workflow(ckpt, args.width, args.width, args.steps, 100 + i), headers)
                ids[prompt_id] = sent
            done = wait_all([port], ids, dict.fromkeys(ids, 0), args.prompt_timeout, [proc])
            bad = [d for d in done.values() if (d["entry"].get("status") or {}).get("status_str") != "success"]
            if bad:
                raise RuntimeError(json.dumps(bad[0]["entry"].get("status"))[:2000])
        res["run_s"] = round(time.monotonic() - t0, 2)
        time.sleep(2)
        res["rss_gib"] = round((proc_status_kib(proc.pid, "VmRSS") or 0) / 2**20, 3)
        res["rss_peak_gib"] = round((proc_status_kib(proc.pid, "VmHWM") or 0) / 2**20, 3)
        res["gpu_mem_used_mib"] = gpu_memory_used()
        try:
            res["weights"] = http(port, "/multigpu/status").get("weights")
        except (OSError, urllib.error.URLError, ValueError):
            pass
        print(f"[{name}] RSS {res['rss_gib']} GiB (idle {res['rss_idle_gib']}, peak {res['rss_peak_gib']}) "
              f"in {res['run_s']} s", flush=True)
    except Exception as err:  # noqa: BLE001 - reported in the table; the next scenario still runs
        res["failed"] = f"{type(err).__name__}: {err}"
        print(f"[{name}] FAILED: {res['failed']}\n" + "\n".join(log_path.read_text(errors="replace")
                                                               .splitlines()[-30:]), flush=True)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--comfyui", default="/tmp/comfyui")
    ap.add_argument("--frontend", default=str(REPO / ".device" / "frontend"))
    ap.add_argument("--ckpt", default="sdxl_rand.safetensors")
    ap.add_argument("--ckpt2", default="sd15_rand.safetensors", help="second checkpoint for the alternation runs")
    ap.add_argument("--devices", default="0*2", help="two workers: 0,1 on two GPUs, 0*2 on one")
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--scenarios", default="stock,parallel,parallel-unshared,parallel-ram0,stock-novram,"
                                            "parallel-novram")
    ap.add_argument("--port", type=int, default=8388)
    ap.add_argument("--start-timeout", type=float, default=240)
    ap.add_argument("--prompt-timeout", type=float, default=400)
    ap.add_argument("--out", default=os.environ.get("OUT") or "bench/results/local")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    common = ["--listen", "127.0.0.1", "--disable-auto-launch", "--front-end-root", str(Path(args.frontend).resolve())]
    a, b = args.ckpt, args.ckpt2
    same = [[(a, 0)], [(a, 1)]]                    # device 0 runs it, then device 1
    alternate = [[(a, 0), (b, 1)], [(b, 0), (a, 1)], [(a, 0), (b, 1)]]
    stock_alternate = [[(a, None)], [(b, None)], [(a, None)]]

    def stock(extra: list[str]) -> list[str]:
        return [sys.executable, str(Path(args.comfyui) / "main.py"), *common, *extra, "--port", str(args.port)]

    def parallel(serve: list[str], extra: list[str]) -> list[str]:
        return [sys.executable, "-m", "comfy_parallel", "serve", "--comfyui", args.comfyui, "--devices", args.devices,
                "--entry-ports", "none", *serve, "--", *common, *extra, "--port", str(args.port)]

    scenarios = {
        "stock": (stock([]), [[(a, None)]]),
        "parallel": (parallel([], []), same),
        "parallel-unshared": (parallel(["--shared-weights", "off"], []), same),
        "parallel-ram0": (parallel(["--weights-ram-limit", "0"], []), same),
        "stock-novram": (stock(["--novram"]), stock_alternate),
        "parallel-novram": (parallel([], ["--novram"]), alternate),
        "parallel-pagecache": (parallel(["--host-copy", "page-cache"], []), same),
        "parallel-pagecache-novram": (parallel(["--host-copy", "page-cache"], ["--novram"]), alternate),
    }
    results = []
    for name in args.scenarios.split(","):
        cmd, rounds = scenarios[name]
        results.append(run(name, cmd, args.port, rounds, args, out))
        (out / "shared_weights.json").write_text(json.dumps(results, indent=2))
    by = {r["scenario"]: r for r in results if "rss_gib" in r}
    lines = ["| scenario | RSS after GiB | peak RSS GiB | idle RSS GiB | vs stock | host copies (GiB, pinned) |",
             "|---|---|---|---|---|---|"]
    for r in results:
        if "rss_gib" not in r:
            lines.append(f"| {r['scenario']} | FAILED: {r.get('failed', '')[:150]} | | | | |")
            continue
        base = by.get("stock-novram" if r["scenario"].endswith("novram") else "stock")
        ratio = f"{r['rss_gib'] / base['rss_gib']:.2f}x" if base else "-"
        w = r.get("weights") or {}
        copies = ", ".join(f"{e['name']}: {e['host_bytes'] / 2**30:.2f}{' pinned' if e['pinned'] else ''}"
                           + (f" ({e['page_cache_bytes'] / 2**30:.2f} in the page cache)"
                              if e.get("page_cache_bytes") else "")
                           + f" on {e['devices_loaded']}" for e in w.get("entries", []) if e["host_bytes"] > 2**20)
        lines.append(f"| {r['scenario']} | {r['rss_gib']:.2f} | {r['rss_peak_gib']:.2f} | {r['rss_idle_gib']:.2f} "
                     f"| {ratio} | {copies or '-'} |")
    table = "\n".join(lines)
    print("\n" + table)
    (out / "shared_weights.md").write_text(table + "\n")
    return 0 if all("rss_gib" in r for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
