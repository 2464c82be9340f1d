"""GPU check: stock ComfyUI vs ``comfy-parallel serve`` over HTTP, W1-style txt2img prompts, one table.

Servers (--servers): stock (one ComfyUI process, one GPU), stock-procs (one stock ComfyUI process per device, each
with CUDA_VISIBLE_DEVICES=<ordinal> and its own port, prompts round-robin over them: the setup comfy-parallel
replaces), parallel (comfy-parallel serve on every device) and graphs (the same with --cuda-graphs on).

Runs each server in turn (never two at once): starts it, waits for /system_stats, warms up, submits N prompts to
/prompt, polls /history until all are done, and measures images/s, submit->history latency (p50/p95), the
server's host RSS (VmRSS now, VmHWM peak, from /proc/PID/status; summed over the processes of stock-procs) and,
from history, which device ran each prompt (for stock-procs: which process).

usage (device machine, from the repo root, PYTHONPATH holding the repo and the carried wheels):
    python3 bench/gpu_check.py --comfyui /tmp/comfyui --ckpt sd15_rand.safetensors --out $OUT
local smoke test on CPU (tiny settings):
    python bench/gpu_check.py --comfyui DIR --ckpt X.safetensors --cpu-workers 2 --width 64 --steps 2 --per-gpu 1

Standard library only (plus comfy_parallel.settings for counting CUDA devices without importing torch).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def workflow(ckpt: str, width: int, height: int, steps: int, seed: int, prefix: str = "gpucheck") -> dict:
    """The API-format prompt of tools/wf_sd.py (W1 when 512x512, 20 steps, euler, batch 1)."""
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of a cat", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": width, "height": height, "batch_size": 1}},
        "3": {"class_type": "KSampler", "inputs": {"seed": seed, "steps": steps, "cfg": 7.0, "sampler_name": "euler",
                                                   "scheduler": "normal", "denoise": 1.0, "model": ["4", 0],
                                                   "positive": ["6", 0], "negative": ["7", 0],
                                                   "latent_image": ["5", 0]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": prefix, "images": ["8", 0]}},
    }


# ---------------------------------------------------------------- HTTP

def http(port: int, path: str, body: dict | None = None, timeout: float = 30, headers: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.load(resp)


def submit(port: int, prompt: dict, headers: dict | None = None) -> tuple[str, float, dict]:
    t = time.monotonic()
    try:
        reply = http(port, "/prompt", {"prompt": prompt, "client_id": "gpu-check"}, headers=headers)
    except urllib.error.HTTPError as err:
        raise RuntimeError(f"/prompt answered {err.code}: {err.read()[:2000]!r}") from None
    return reply["prompt_id"], t, reply


class ProcFailed(RuntimeError):
    """A server process exited (or failed to start); ``index`` says which one of the server's processes."""

    def __init__(self, index: int, msg: str):
        super().__init__(msg)
        self.index = index


def check_alive(procs: list[subprocess.Popen], when: str) -> None:
    for k, proc in enumerate(procs):
        if proc.poll() is not None:
            who = "server" if len(procs) == 1 else f"process {k}"
            raise ProcFailed(k, f"{who} exited with {proc.returncode} {when}")


def wait_all(ports: list[int], submitted: dict[str, float], where: dict[str, int], timeout: float,
             procs: list[subprocess.Popen]) -> dict[str, dict]:
    """Poll /history on every port with prompts pending, in one loop, until every submitted prompt is there.

    ``where`` maps a prompt id to the index (into ``ports`` and ``procs``) of the process it was submitted to.
    Returns {prompt_id: {"done_t": t, "entry": entry}}, done_t taken right after that port's /history answer.
    """
    done: dict[str, dict] = {}
    deadline = time.monotonic() + timeout
    while len(done) < len(submitted):
        check_alive(procs, "while prompts were pending")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out: {len(done)}/{len(submitted)} prompts done after {timeout:.0f}s")
        pending = {where[p] for p in submitted if p not in done}
        for k in sorted(pending):
            hist = http(ports[k], "/history")
            now = time.monotonic()
            for pid in submitted:
                if pid not in done and where[pid] == k and pid in hist:
                    entry = hist[pid]
                    status = entry.get("status") or {}
                    if status.get("completed") or status.get("status_str") in ("success", "error"):
                        done[pid] = {"done_t": now, "entry": entry}
        time.sleep(0.05)
    return done


# ---------------------------------------------------------------- process memory

def proc_status_kib(pid: int, field: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def sum_status_gib(pids: list[int], field: str) -> float:
    """A /proc status field summed over processes, in GiB (a process that is gone counts 0)."""
    return round(sum(proc_status_kib(pid, field) or 0 for pid in pids) / 2**20, 3)


class RssSampler(threading.Thread):
    """Samples the VmRSS sum of the processes every 0.25 s (VmHWM gives the kernel's own peak; this is a
    cross-check, and for several processes the peak of the sum, which the sum of VmHWMs overstates)."""

    def __init__(self, pids: list[int]):
        super().__init__(daemon=True)
        self.pids, self.peak_kib, self.stop_flag = list(pids), 0, threading.Event()

    def add(self, pid: int) -> None:
        self.pids = self.pids + [pid]

    def run(self) -> None:
        while not self.stop_flag.is_set():
            v = sum(proc_status_kib(pid, "VmRSS") or 0 for pid in self.pids)
            if v:
                self.peak_kib = max(self.peak_kib, v)
            self.stop_flag.wait(0.25)


def gpu_memory_used() -> list[int] | None:
    """MiB used per GPU, from nvidia-smi (None where it is missing)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20).stdout
        return [int(x) for x in out.split()]
    except (OSError, ValueError, subprocess.SubprocessError):
        return None


# ---------------------------------------------------------------- stats

def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    xs = sorted(values)
    if not xs:
        return float("nan")
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def exec_seconds(entry: dict) -> float | None:
    """Server-side execution time from the history entry's status messages (ms timestamps)."""
    msgs = {m[0]: m[1] for m in (entry.get("status") or {}).get("messages", []) if isinstance(m, list) and len(m) == 2}
    start, end = msgs.get("execution_start", {}), msgs.get("execution_success", {})
    if "timestamp" in start and "timestamp" in end:
        return (end["timestamp"] - start["timestamp"]) / 1000
    return None


# ---------------------------------------------------------------- one server

# (command, port, extra environment) of one server process
Target = tuple[list[str], int, dict[str, str]]


def stop_all(procs: list[subprocess.Popen], grace: float = 20) -> None:
    """SIGINT to every process still running (ComfyUI stops on KeyboardInterrupt), then kill what is left."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
    deadline = time.monotonic() + grace
    for proc in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def log_tail(path: Path, n: int) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-n:]
    except OSError as err:
        return [f"(no log: {err})"]


def run_server(name: str, targets: list[Target], args: argparse.Namespace, ndev: int, out: Path) -> dict:
    """Start the server's processes (one for stock/parallel/graphs, one per device for stock-procs), warm up,
    measure, stop them. Prompts go round-robin over the processes; ``ndev`` sizes the warm-up and the run."""
    multi = len(targets) > 1
    ports = [port for _, port, _ in targets]
    log_path = out / f"{args.label}_{name}.log"
    # several processes log to parts first, concatenated into log_path at the end (the device tool brings back
    # 8 files at most)
    part_paths = [out / f"{args.label}_{name}-{k}.log" for k in range(len(targets))] if multi else [log_path]
    prefixes = [f"gpucheck-p{k}" for k in range(len(targets))] if multi else ["gpucheck"]  # no SaveImage name races
    res: dict = {"server": name, "cmd": [t[0] for t in targets] if multi else targets[0][0], "devices": ndev,
                 "log": log_path.name}
    if multi:
        res["procs"] = [{"port": port, **extra} for _, port, extra in targets]
    base_env = dict(os.environ, PYTHONUNBUFFERED="1", NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1",
                    NVSHMEM_DISABLE_NVLS="1")
    procs: list[subprocess.Popen] = []
    logs = []
    failed_index: int | None = None
    sampler = RssSampler([])

    def submit_round_robin(seeds: list[int], what: str) -> tuple[dict[str, float], dict[str, int], dict[str, int],
                                                                   dict[str, int]]:
        submitted: dict[str, float] = {}
        where: dict[str, int] = {}
        seed_of: dict[str, int] = {}
        assigned: dict[str, int] = {}
        for i, seed in enumerate(seeds):
            k = i % len(ports)
            try:
                pid, t, reply = submit(ports[k], workflow(args.ckpt, args.width, args.width, args.steps, seed,
                                                          prefixes[k]))
            except (RuntimeError, OSError, ValueError) as err:
                raise ProcFailed(k, f"{what} submit{f' to process {k}' if multi else ''}: {err}") from None
            submitted[pid], where[pid], seed_of[pid] = t, k, seed
            if "gpu_id" in reply:
                assigned[pid] = reply["gpu_id"]
        return submitted, where, seed_of, assigned

    def first_failure(done: dict[str, dict], where: dict[str, int]) -> tuple[str, int] | None:
        bad = [p for p, d in done.items() if (d["entry"].get("status") or {}).get("status_str") != "success"]
        return (bad[0], where[bad[0]]) if bad else None

    t_start = time.monotonic()
    try:
        for k, (cmd, port, extra) in enumerate(targets):
            env_text = "".join(f"{key}={val} " for key, val in extra.items())
            print(f"[{name}] starting{f' process {k}' if multi else ''}: {env_text}{' '.join(cmd)}", flush=True)
            logs.append(open(part_paths[k], "w"))
            try:
                procs.append(subprocess.Popen(cmd, stdout=logs[-1], stderr=subprocess.STDOUT,
                                              env=dict(base_env, **extra), cwd=str(REPO)))
            except OSError as err:
                raise ProcFailed(k, f"could not start{f' process {k}' if multi else ''}: {err}") from None
            sampler.add(procs[-1].pid)
        sampler.start()
        pids = [proc.pid for proc in procs]

        deadline = time.monotonic() + args.start_timeout
        stats: dict[int, dict] = {}
        while len(stats) < len(ports):
            check_alive(procs, "before answering")
            if time.monotonic() > deadline:
                late = [k for k in range(len(ports)) if k not in stats]
                who = f"process(es) {late}" if multi else "server"
                raise RuntimeError(f"{who} did not answer /system_stats in {args.start_timeout}s")
            for k, port in enumerate(ports):
                if k not in stats:
                    try:
                        stats[k] = http(port, "/system_stats", timeout=5)
                    except (OSError, urllib.error.URLError, ValueError):
                        pass
            if len(stats) < len(ports):
                time.sleep(0.5)
        res["startup_s"] = round(time.monotonic() - t_start, 2)
        res["system_stats_devices"] = [d.get("name") for k in range(len(ports)) for d in stats[k].get("devices", [])]
        res["rss_idle_gib"] = sum_status_gib(pids, "VmRSS")
        print(f"[{name}] up in {res['startup_s']}s; devices {res['system_stats_devices']}", flush=True)

        # warm-up: max(warmup, ndev) prompts at once, so every device loads the model and compiles its kernels.
        n_warm = max(args.warmup, ndev)
        t0 = time.monotonic()
        warm, warm_where, _, _ = submit_round_robin([10_000 + i for i in range(n_warm)], "warm-up")
        wdone = wait_all(ports, warm, warm_where, args.prompt_timeout, procs)
        res["warmup_prompts"] = n_warm
        res["warmup_s"] = round(time.monotonic() - t0, 2)
        bad = first_failure(wdone, warm_where)
        if bad:
            raise ProcFailed(bad[1], f"warm-up prompt failed{f' (process {bad[1]})' if multi else ''}: "
                                     f"{json.dumps(wdone[bad[0]]['entry'].get('status'))[:3000]}")
        print(f"[{name}] warm-up: {n_warm} prompts in {res['warmup_s']}s", flush=True)

        # measured run: every prompt submitted at once (round-robin over the processes), then one polling loop
        n = args.per_gpu * ndev
        submitted, where, seed_of, assigned = submit_round_robin([1 + i for i in range(n)], "measured")
        t_first = min(submitted.values())
        done = wait_all(ports, submitted, where, args.prompt_timeout, procs)
        wall = max(d["done_t"] for d in done.values()) - t_first
        lat = [done[p]["done_t"] - submitted[p] for p in submitted]
        execs = [e for e in (exec_seconds(d["entry"]) for d in done.values()) if e is not None]
        statuses = [(d["entry"].get("status") or {}).get("status_str") for d in done.values()]
        per_dev: dict[str, int] = {}
        for pid, d in done.items():
            key = str(where[pid]) if multi else str(d["entry"].get("gpu_id", "-"))
            per_dev[key] = per_dev.get(key, 0) + 1
        digests: dict[str, list[int]] = {}
        for k, port in enumerate(ports):
            digests.update(image_digests(port, done, {p: t for p, t in submitted.items() if where[p] == k}, seed_of))
        res["image_digests"] = dict(sorted(digests.items(), key=lambda kv: int(kv[0])))
        res.update({
            "images": n, "ok": statuses.count("success"), "errors": n - statuses.count("success"),
            "wall_s": round(wall, 3), "img_per_s": round(n / wall, 4),
            "latency_p50_s": round(percentile(lat, 50), 3), "latency_p95_s": round(percentile(lat, 95), 3),
            "latency_max_s": round(max(lat), 3),
            "exec_mean_s": round(sum(execs) / len(execs), 3) if execs else None,
            "per_device": dict(sorted(per_dev.items(), key=lambda kv: (len(kv[0]), kv[0]))),
            "assigned_at_submit": {str(k): list(assigned.values()).count(k) for k in sorted(set(assigned.values()))},
            "rss_gib": sum_status_gib(pids, "VmRSS"),
            "rss_peak_gib": sum_status_gib(pids, "VmHWM"),
            "rss_peak_sampled_gib": round(sampler.peak_kib / 2**20, 3),
            "gpu_mem_used_mib": gpu_memory_used(),
        })
        bad = first_failure(done, where)
        if bad:
            res["first_error"] = json.dumps(done[bad[0]]["entry"].get("status"))[:3000]
            if multi:
                res["first_error_process"] = bad[1]
        print(f"[{name}] {n} images in {wall:.2f}s = {n / wall:.3f} img/s; p50 {res['latency_p50_s']}s "
              f"p95 {res['latency_p95_s']}s; RSS {res['rss_gib']} GiB (peak {res['rss_peak_gib']}); "
              f"per device {res['per_device']}", flush=True)
    except Exception as err:  # noqa: BLE001 - reported in the table, the other servers still run
        res["failed"] = f"{type(err).__name__}: {err}"
        if isinstance(err, ProcFailed):
            failed_index = err.index
            if multi:
                res["failed_process"] = err.index
        print(f"[{name}] FAILED: {res['failed']}", flush=True)
    finally:
        sampler.stop_flag.set()
        stop_all(procs)
        codes = [proc.returncode for proc in procs]
        res["exit_code"] = codes if multi else (codes[0] if codes else None)
        for log in logs:
            log.close()
        if "failed" in res:
            # the failing process's tail when known, else every process's
            shown = [failed_index] if failed_index is not None else list(range(len(logs)))
            n_lines = 40 if len(shown) == 1 else 15
            for k in shown:
                which = f" process {k}" if multi else ""
                print(f"[{name}]{which} last log lines:\n  " + "\n  ".join(log_tail(part_paths[k], n_lines)),
                      flush=True)
        if multi:
            with open(log_path, "w") as combined:
                for k, part in enumerate(part_paths[:len(logs)]):
                    _, port, extra = targets[k]
                    env_text = "".join(f" {key}={val}" for key, val in extra.items())
                    combined.write(f"===== {name} process {k}: port {port}{env_text}, exit code "
                                   f"{codes[k] if k < len(codes) else None} =====\n")
                    try:
                        combined.write(part.read_text(errors="replace"))
                        part.unlink()
                    except OSError as err:
                        combined.write(f"(log part unreadable: {err})\n")
    return res


def image_digests(port: int, done: dict, submitted: dict, seeds: dict[str, int]) -> dict[str, list[int]]:
    """Per seed, a coarse fingerprint of the saved image (mean of each 16th row): equal images, equal lists."""
    import io

    out: dict[str, list[int]] = {}
    for pid in submitted:
        try:
            img = done[pid]["entry"]["outputs"]["9"]["images"][0]
            url = (f"http://127.0.0.1:{port}/view?filename={urllib.parse.quote(img['filename'])}"
                   f"&subfolder={urllib.parse.quote(img['subfolder'])}&type={img['type']}")
            data = urllib.request.urlopen(url, timeout=30).read()
            from PIL import Image

            px = Image.open(io.BytesIO(data)).convert("L")
            w, h = px.size
            rows = [sum(px.getpixel((x, y)) for x in range(0, w, 4)) // len(range(0, w, 4)) for y in range(0, h, 16)]
            out[str(seeds[pid])] = rows
        except Exception as err:  # noqa: BLE001 - a missing digest shows as absent in the comparison
            out[str(seeds[pid])] = [f"{type(err).__name__}: {err}"]  # type: ignore[list-item]
    return out


def seed_diffs(base: dict[str, list], other: dict[str, list]) -> dict[str, int | None]:
    """Per seed of ``base``: max |row mean difference| to ``other``'s image (None: missing or unreadable there)."""
    diffs: dict[str, int | None] = {}
    for seed, rows in base.items():
        got = other.get(seed)
        readable = got and all(isinstance(v, int) for v in rows + got) and len(got) == len(rows)
        diffs[seed] = max(abs(a - b) for a, b in zip(rows, got)) if readable else None
    return diffs


def same_images(results: list[dict]) -> str:
    """Compare every server's images with the first one's, seed by seed (max difference of row means)."""
    base = next((r for r in results if r.get("image_digests")), None)
    if base is None:
        return ""
    lines = ["", "", f"images vs {base['server']} (same seeds; max |row mean difference| over rows, 0..255):"]
    for r in results:
        if r is base or not r.get("image_digests"):
            continue
        diffs = [d for d in seed_diffs(base["image_digests"], r["image_digests"]).values() if d is not None]
        lines.append(f"  {r['server']}: {len(diffs)} seeds compared, max diff {max(diffs) if diffs else '-'}")
    return "\n".join(lines)


# ---------------------------------------------------------------- table

def table(results: list[dict]) -> str:
    head = ("| server | devices | images | ok | wall s | img/s | p50 s | p95 s | exec mean s | RSS GiB | peak RSS GiB "
            "| per-device (history gpu_id) | startup s | warm-up s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        if "failed" in r and "img_per_s" not in r:
            lines.append(f"| {r['server']} | {r['devices']} | FAILED: {r['failed'][:200]} |" + " |" * 11)
            continue
        per = ", ".join(f"{k}:{v}" for k, v in r["per_device"].items())
        lines.append(f"| {r['server']} | {r['devices']} | {r['images']} | {r['ok']} | {r['wall_s']:.2f} "
                     f"| {r['img_per_s']:.3f} | {r['latency_p50_s']:.2f} | {r['latency_p95_s']:.2f} "
                     f"| {r['exec_mean_s'] if r['exec_mean_s'] is not None else '-'} "
                     f"| {r['rss_gib']:.2f} | {r['rss_peak_gib']:.2f} | {per} | {r['startup_s']} | {r['warmup_s']} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--comfyui", default="/tmp/comfyui")
    ap.add_argument("--frontend", default=str(REPO / ".device" / "frontend"))
    ap.add_argument("--ckpt", default="sd15_rand.safetensors", help="name under ComfyUI's models/checkpoints")
    ap.add_argument("--label", default="W1", help="workload label for the table and JSON")
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--per-gpu", type=int, default=8, help="measured prompts per device")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--devices", help="CUDA ordinals for comfy-parallel (default: every visible GPU)")
    ap.add_argument("--cpu-workers", type=int, default=0, help="local smoke test: no GPU, N CPU workers")
    ap.add_argument("--servers", default="stock,parallel",
                    help="comma list of stock (one ComfyUI process, one device), stock-procs (one stock ComfyUI "
                         "process per device, prompts round-robin), parallel, graphs (parallel with CUDA graphs)")
    ap.add_argument("--port", type=int, default=8288)
    ap.add_argument("--start-timeout", type=float, default=240)
    ap.add_argument("--prompt-timeout", type=float, default=600)
    ap.add_argument("--out", default=os.environ.get("OUT") or "bench/results/local")
    args = ap.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ordinals: list[int | None]  # per device: its CUDA ordinal, None for a CPU worker
    if args.cpu_workers:
        devices_arg = ",".join(["cpu"] * args.cpu_workers)
        ndev = args.cpu_workers
        ordinals = [None] * ndev
    else:
        if args.devices:
            devices_arg = args.devices
        else:
            sys.path.insert(0, str(REPO))
            from comfy_parallel.settings import cuda_device_count
            count = cuda_device_count()
            if not count:
                print("no CUDA device visible (use --cpu-workers N for a CPU smoke test)", file=sys.stderr)
                return 2
            devices_arg = ",".join(str(i) for i in range(count))
        sys.path.insert(0, str(REPO))
        from comfy_parallel.settings import parse_devices
        specs = parse_devices(devices_arg)
        ndev = len(specs)
        ordinals = [s.ordinal if s.kind == "cuda" else None for s in specs]
    comfy_common = ["--listen", "127.0.0.1", "--disable-auto-launch", "--disable-api-nodes",
                    "--front-end-root", str(Path(args.frontend).resolve())]
    cpu = ["--cpu"] if args.cpu_workers else []
    main_py = str(Path(args.comfyui) / "main.py")
    # CUDA_VISIBLE_DEVICES of a stock-procs process: the ordinal, mapped through this process's own
    # CUDA_VISIBLE_DEVICES when that is set (ordinals count the GPUs visible here)
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]

    def cuda_env(ordinal: int | None) -> dict[str, str]:
        if ordinal is None:
            return {}
        return {"CUDA_VISIBLE_DEVICES": visible[ordinal] if ordinal < len(visible) else str(ordinal)}

    def stock_cmd(port: int, cpu_flag: list[str] = cpu) -> list[str]:
        return [sys.executable, main_py, *comfy_common, *cpu_flag, "--port", str(port)]

    # name: ([(command, port, extra environment), ...], devices)
    servers: dict[str, tuple[list[Target], int]] = {
        # stock ComfyUI drives one device, whatever is visible
        "stock": ([(stock_cmd(args.port), args.port, {})], 1),
        # one stock ComfyUI per device, each seeing only its own GPU (CPU workers: one --cpu process each)
        "stock-procs": ([(stock_cmd(args.port + 10 + k, cpu if o is not None else ["--cpu"]), args.port + 10 + k,
                          cuda_env(o)) for k, o in enumerate(ordinals)], ndev),
        "parallel": ([([sys.executable, "-m", "comfy_parallel", "serve", "--comfyui", args.comfyui,
                        "--devices", devices_arg, "--entry-ports", "none", "--",
                        *comfy_common, "--port", str(args.port + 1)], args.port + 1, {})], ndev),
        "graphs": ([([sys.executable, "-m", "comfy_parallel", "serve", "--comfyui", args.comfyui,
                      "--devices", devices_arg, "--entry-ports", "none", "--cuda-graphs", "on", "--",
                      *comfy_common, "--port", str(args.port + 2)], args.port + 2, {})], ndev),
    }
    names = [n.strip() for n in args.servers.split(",") if n.strip()]
    unknown = [n for n in names if n not in servers]
    if unknown:
        print(f"unknown server(s) {unknown}; choose from {', '.join(servers)}", file=sys.stderr)
        return 2
    meta = {
        "label": args.label, "width": args.width, "height": args.width, "steps": args.steps, "sampler": "euler",
        "batch": 1, "per_gpu": args.per_gpu, "ckpt": args.ckpt, "devices_arg": devices_arg,
        "python": sys.version.split()[0], "host": platform.node(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    # a SIGTERM (e.g. from `timeout`) unwinds through run_server's finally, which stops the processes it started
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    results: list[dict] = []
    for name in names:
        targets, n = servers[name]
        results.append(run_server(name, targets, args, n, out))
        (out / f"{args.label}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    md_same = same_images(results)
    md = (f"{args.label}: {args.width}x{args.width}, {args.steps} steps, euler, batch 1, {args.per_gpu} prompts per "
          f"device, ckpt {args.ckpt}; comfy-parallel --devices {devices_arg}\n\n" + table(results) + md_same)
    print("\nTABLE " + args.label + "\n" + md, flush=True)
    return 0 if all("failed" not in r for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
