"""Scheduling benchmark (issue 16): late binding with model/cache affinity against shortest-queue and stock + nginx.

Streams, the same seeded sequence on every server:
  a  three SDXL-shaped checkpoints requested in random order (a burst: every prompt submitted at once)
  b  two clients, each iterating on its own workflow (only the seed changes): each sends a prompt (--b-burst
     prompts: ComfyUI's batch count), waits for its result, sends the next (--b-rounds rounds), both at the same
     time; the first prompt of each client cannot find its text encodes cached anywhere
  c  long and short jobs mixed (--c-long prompts of 20 steps at 1024^2, --c-short of 4 steps at 512^2), in random
     order, arriving at random (exponential gaps) at --c-load of the two workers' capacity, measured once on the
     first server's warm-up and kept for every server
Servers (--servers, comma list; NAME:STREAMS runs only those streams, e.g. fifo:a):
  pool   comfy-parallel --default-route pool (the affinity scheduler)
  auto   comfy-parallel --default-route auto (shortest queue when the prompt arrives: the default before runs 3-4)
  fifo   comfy-parallel --default-route pool --affinity-slack 0 (late binding, first in first out: the reference of
         the starvation goal)
  stock  one stock ComfyUI process per worker (two on one GPU for --devices 0*2) behind nginx least_conn; without an
         nginx binary (--nginx), the same least-connections choice made by this client (marked in the table)
VRAM budget: --worker-vram-gib per worker (default 12: one SDXL-shaped checkpoint, 6.9 GB, with room to sample, not
two). comfy-parallel gets --worker-vram-limit; stock gets ComfyUI's --reserve-vram (GPU memory minus the budget of
the processes on that GPU), which makes a stock process unload its models when the GPU's free memory runs short.
Stock runs with --disable-dynamic-vram where ComfyUI has it (comfy-parallel's own loading mode; 0.33's DynamicVRAM
loads differently and would not be compared like for like).
Figures per stream and server: img/s (images / (last end - first submit)), p50/p95 latency (submit to end), model
loads per 100 prompts (ComfyUI's 'loaded completely|partially' log lines: every load of a UNet, CLIP or VAE, the
same count for every server), executor-cache hits (prompts whose two text encodes came from the cache), longest
wait (submit to start), prompts per worker.

usage (device machine, repo root; bench/affinity.sh does the setup):
    python3 bench/affinity.py --comfyui /tmp/comfyui --ckpt-dir /tmp/comfyui/models/checkpoints --devices '0*2'
CPU smoke test (tiny sizes, an SD1.5-shaped checkpoint under three names):
    python bench/affinity.py --cpu --comfyui DIR --ckpt-dir DIR --ckpts a.safetensors,b.safetensors,c.safetensors
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_check import http, log_tail, stop_all  # noqa: E402

LOAD_RE = re.compile(r"loaded (?:completely|partially);")
TEXT_NODES = ("6", "7")
SAVE_NODE = "9"
STREAMS = ("a", "b", "c")


# ---------------------------------------------------------------- prompts

def txt2img(ckpt: str, size: int, steps: int, seed: int, text: str, prefix: str) -> dict:
    """SDXL/SD1.5 txt2img with the text encodes as nodes 6 and 7 (what the executor cache may answer)."""
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry, low quality", "clip": ["4", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "3": {"class_type": "KSampler", "inputs": {
            "seed": seed, "steps": steps, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
            "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        SAVE_NODE: {"class_type": "SaveImage", "inputs": {"filename_prefix": prefix, "images": ["8", 0]}},
    }


@dataclass
class Job:
    key: str
    prompt: dict
    client: str = "affinity-bench"
    at_s: float | None = None  # paced arrival: seconds after the stream starts
    kind: str = ""


def stream_a(args: argparse.Namespace, rng: random.Random) -> list[Job]:
    return [Job(f"a{i}", txt2img(ckpt, args.size_long, args.steps_long, 1000 + i, "a photo of a lighthouse", "aff_a"),
                kind=ckpt)
            for i, ckpt in enumerate(rng.choice(args.ckpts) for _ in range(args.a_prompts))]


def stream_b_client(args: argparse.Namespace, client: int, round_: int) -> list[Job]:
    texts = ("a watercolor of a fox in the snow", "a studio photo of a red sports car")
    return [Job(f"b{client}r{round_}p{i}", txt2img(args.ckpts[0], args.size_b, args.steps_b,
                                                   2000 + 100 * client + 10 * round_ + i, texts[client], "aff_b"),
                client=f"affinity-client-{client}", kind=f"client{client}")
            for i in range(args.b_burst)]


def stream_c(args: argparse.Namespace, rng: random.Random, gap_s: float) -> list[Job]:
    kinds = ["long"] * args.c_long + ["short"] * args.c_short
    rng.shuffle(kinds)
    jobs, t = [], 0.0
    for i, kind in enumerate(kinds):
        size, steps = (args.size_long, args.steps_long) if kind == "long" else (args.size_short, args.steps_short)
        jobs.append(Job(f"c{i}", txt2img(args.ckpts[0], size, steps, 3000 + i, "a cabin in a pine forest", "aff_c"),
                        at_s=round(t, 3), kind=kind))
        t += rng.expovariate(1.0 / gap_s)
    return jobs


# ---------------------------------------------------------------- talking to servers

@dataclass
class Sub:
    job: Job
    prompt_id: str | None = None
    submit_t: float = 0.0  # wall clock, as the server's timestamps
    answer: dict = field(default_factory=dict)
    entry: dict | None = None
    backend: int | None = None  # which stock process ran it
    error: str | None = None

    @property
    def done(self) -> bool:
        return self.entry is not None or self.error is not None


def messages(entry: dict) -> dict:
    return {m[0]: m[1] for m in (entry.get("status") or {}).get("messages", []) if isinstance(m, list) and len(m) == 2}


class Front:
    """Where prompts go in and history comes out: one comfy-parallel port, or stock backends (behind nginx)."""

    def __init__(self, submit_port: int, history_ports: list[int], client_side_least_conn: bool = False) -> None:
        self.submit_port = submit_port
        self.history_ports = history_ports
        self.client_side = client_side_least_conn
        self._in_flight = [0] * len(history_ports)
        self._next = 0
        self._lock = threading.Lock()

    def _port_for_submit(self) -> tuple[int, int | None]:
        if not self.client_side:
            return self.submit_port, None
        with self._lock:  # nginx least_conn: fewest requests in flight, ties in turn
            n = len(self.history_ports)
            order = [(self._next + k) % n for k in range(n)]
            index = min(order, key=lambda i: self._in_flight[i])
            self._next = (index + 1) % n
            self._in_flight[index] += 1
        return self.history_ports[index], index

    def submit(self, sub: Sub, headers: dict | None = None, port: int | None = None) -> None:
        chosen, index = (port, None) if port is not None else self._port_for_submit()
        sub.submit_t = time.time()
        try:
            sub.answer = http(chosen, "/prompt", {"prompt": sub.job.prompt, "client_id": sub.job.client},
                              headers=headers)
            sub.prompt_id = sub.answer["prompt_id"]
        except (urllib.error.URLError, OSError, KeyError, ValueError) as err:
            body = err.read()[:500] if isinstance(err, urllib.error.HTTPError) else b""
            sub.error = f"/prompt failed: {err} {body!r}"
        finally:
            if index is not None:
                with self._lock:
                    self._in_flight[index] -= 1

    def poll(self, subs: list[Sub]) -> None:
        """Fill in the history entries of the finished ones (each backend's /history once)."""
        waiting = {s.prompt_id: s for s in subs if not s.done and s.prompt_id}
        if not waiting:
            return
        for backend, port in enumerate(self.history_ports):
            try:
                hist = http(port, "/history", timeout=30)
            except (OSError, ValueError):
                continue
            for pid, entry in hist.items():
                sub = waiting.get(pid)
                status = (entry or {}).get("status") or {}
                if sub is not None and (status.get("completed") or status.get("status_str") in ("success", "error")):
                    sub.entry, sub.backend = entry, backend


def wait_done(front: Front, subs: list[Sub], deadline: float, procs: list[subprocess.Popen]) -> str | None:
    while True:
        front.poll(subs)
        if all(s.done for s in subs):
            return None
        if any(p.poll() is not None for p in procs):
            return "a server process exited"
        if time.monotonic() > deadline:
            return f"out of time with {sum(not s.done for s in subs)} prompts pending"
        time.sleep(0.1)


def count_loads(logs: list[Path], offsets: list[int]) -> int:
    total = 0
    for path, offset in zip(logs, offsets):
        with open(path, "rb") as f:
            f.seek(offset)
            total += len(LOAD_RE.findall(f.read().decode(errors="replace")))
    return total


def log_sizes(logs: list[Path]) -> list[int]:
    return [p.stat().st_size if p.exists() else 0 for p in logs]


# ---------------------------------------------------------------- figures

def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def figures(subs: list[Sub], loads: int) -> dict:
    ok = [s for s in subs if s.entry is not None and (s.entry.get("status") or {}).get("status_str") == "success"]
    out: dict = {"prompts": len(subs), "errors": len(subs) - len(ok), "model_loads": loads,
                 "loads_per_100": round(100 * loads / len(subs), 1) if subs else None}
    if not ok:
        return out
    ends, starts, lat, waits, cached, execs = [], [], [], [], 0, []
    workers: dict[str, int] = {}
    for s in ok:
        msgs = messages(s.entry)
        end = msgs.get("execution_success", {}).get("timestamp")
        start = msgs.get("execution_start", {}).get("timestamp")
        if end is None or start is None:
            continue
        ends.append(end / 1000)
        starts.append(start / 1000)
        lat.append(end / 1000 - s.submit_t)
        waits.append(start / 1000 - s.submit_t)
        execs.append((end - start) / 1000)
        nodes = set(msgs.get("execution_cached", {}).get("nodes") or [])
        cached += all(n in nodes for n in TEXT_NODES)
        label = f"gpu{s.entry['gpu_id']}" if "gpu_id" in s.entry else f"proc{s.backend}"
        workers[label] = workers.get(label, 0) + 1
    if not ends:
        return out
    wall = max(ends) - min(s.submit_t for s in subs)
    out.update({"wall_s": round(wall, 2), "img_per_s": round(len(ok) / wall, 4) if wall > 0 else None,
                "p50_s": round(percentile(lat, 0.5), 2), "p95_s": round(percentile(lat, 0.95), 2),
                "longest_wait_s": round(max(waits), 2), "mean_exec_s": round(sum(execs) / len(execs), 3),
                "cached_text_encodes": cached, "cache_hit_pct": round(100 * cached / len(ok), 1),
                "per_worker": dict(sorted(workers.items()))})
    first_error = next((s for s in subs if s not in ok), None)
    if first_error is not None:
        msgs = messages(first_error.entry) if first_error.entry else {}
        err = msgs.get("execution_error", {})
        out["first_error"] = first_error.error or f"{err.get('exception_type')}: {err.get('exception_message')}"
    return out


# ---------------------------------------------------------------- servers

@dataclass
class Spec:
    name: str
    kind: str  # parallel | stock
    streams: tuple[str, ...]
    serve_args: list[str] = field(default_factory=list)


def parse_servers(text: str) -> list[Spec]:
    known = {"pool": ["--default-route", "pool"], "auto": ["--default-route", "auto"],
             "fifo": ["--default-route", "pool", "--affinity-slack", "0"]}
    specs = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        name, _, streams = part.partition(":")
        wanted = tuple(s for s in (streams or "abc") if s in STREAMS)
        if name == "stock":
            specs.append(Spec(name, "stock", wanted))
        elif name in known:
            specs.append(Spec(name, "parallel", wanted, known[name]))
        else:
            raise SystemExit(f"unknown server {name!r}: pool, auto, fifo or stock (optionally :STREAMS, e.g. fifo:a)")
    return specs


def gpu_total_gib() -> list[float]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20).stdout
        return [int(x) / 1024 for x in out.split()]
    except (OSError, ValueError, subprocess.SubprocessError):
        return []


def comfy_has_flag(comfyui: str, flag: str) -> bool:
    cli_args = Path(comfyui) / "comfy" / "cli_args.py"
    return cli_args.exists() and flag in cli_args.read_text(errors="replace")


def nginx_conf(work: Path, port: int, backends: list[int]) -> Path:
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    user = "user root;\n" if os.geteuid() == 0 else ""
    servers = "".join(f"    server 127.0.0.1:{p};\n" for p in backends)
    conf = work / "nginx.conf"
    conf.write_text(f"""{user}worker_processes 1;
daemon off;
pid {work}/nginx.pid;
error_log {work}/error.log warn;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  client_body_temp_path {work}/body; proxy_temp_path {work}/proxy; fastcgi_temp_path {work}/fastcgi;
  uwsgi_temp_path {work}/uwsgi; scgi_temp_path {work}/scgi;
  client_max_body_size 100m;
  upstream comfyui {{
    least_conn;
{servers}  }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://comfyui;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_read_timeout 3600s;
    }}
  }}
}}
""")
    return conf


class Servers:
    """The processes of one server under test, their logs, and how to reach them."""

    def __init__(self, spec: Spec, args: argparse.Namespace, out: Path) -> None:
        self.spec, self.args, self.out = spec, args, out
        self.procs: list[subprocess.Popen] = []
        self.logs: list[Path] = []
        self.files: list = []
        self.front: Front | None = None
        self.ports: list[int] = []
        self.proxy = "-"

    def _start(self, cmd: list[str], log: Path, env: dict[str, str]) -> None:
        f = open(log, "w")
        self.files.append(f)
        self.logs.append(log)
        self.procs.append(subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=str(REPO)))

    def start(self) -> None:
        a = self.args
        env = dict(os.environ, PYTHONUNBUFFERED="1", NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1",
                   NVSHMEM_DISABLE_NVLS="1")
        common = ["--listen", "127.0.0.1", "--disable-auto-launch", "--disable-api-nodes",
                  "--extra-model-paths-config", str(a.extra_paths)]
        if a.frontend:
            common += ["--front-end-root", str(Path(a.frontend).resolve())]
        if a.cpu:
            common.append("--cpu")
        if self.spec.kind == "parallel":
            port = a.port
            cp = ["--devices", a.devices, "--entry-ports", "none", *self.spec.serve_args]
            if not a.cpu:
                cp += ["--worker-vram-limit", f"{a.worker_vram_gib}G"]
            self._start([sys.executable, "-m", "comfy_parallel", "serve", "--comfyui", a.comfyui, *cp, "--",
                         *common, "--port", str(port)], self.out / f"{self.spec.name}.log", env)
            self.ports = [port]
            self.front = Front(port, [port])
            return
        from comfy_parallel.settings import parse_devices

        specs = parse_devices(a.devices)
        totals = gpu_total_gib()
        stock_extra = ["--disable-dynamic-vram"] if comfy_has_flag(a.comfyui, "--disable-dynamic-vram") else []
        for i, dev in enumerate(specs):
            port = a.port + 1 + i
            extra = list(stock_extra)
            denv = dict(env)
            if dev.kind == "cuda":
                denv["CUDA_VISIBLE_DEVICES"] = str(dev.ordinal)
                sharing = sum(d.ordinal == dev.ordinal for d in specs)
                if dev.ordinal is not None and dev.ordinal < len(totals):
                    reserve = max(0.0, totals[dev.ordinal] - sharing * a.worker_vram_gib)
                    extra += ["--reserve-vram", f"{reserve:.1f}"]
            self._start([sys.executable, str(Path(a.comfyui) / "main.py"), *common, *extra, "--port", str(port)],
                        self.out / f"{self.spec.name}{i}.log", denv)
            self.ports.append(port)
        nginx = a.nginx or shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
        if nginx and self._start_nginx(nginx):
            self.proxy = "nginx least_conn"
            self.front = Front(a.port, self.ports)
        else:
            self.proxy = "least_conn in the client (no nginx)"
            self.front = Front(a.port, self.ports, client_side_least_conn=True)

    def _start_nginx(self, binary: str) -> bool:
        work = Path(tempfile.mkdtemp(prefix="affinity-nginx-"))
        conf = nginx_conf(work, self.args.port, self.ports)
        log = self.out / f"{self.spec.name}_nginx.log"
        self._start([binary, "-p", str(work), "-c", str(conf), "-e", str(work / "error.log")], log, dict(os.environ))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.procs[-1].poll() is not None:
                print(f"[{self.spec.name}] nginx exited: {log.read_text(errors='replace')[-800:]}", flush=True)
                self.procs.pop()
                self.logs.pop()
                return False
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.args.port}/", timeout=2)
                return True
            except urllib.error.HTTPError:
                return True  # nginx answered (502 while the backends start)
            except OSError:
                time.sleep(0.2)
        return False

    def comfy_logs(self) -> list[Path]:
        return [p for p in self.logs if not p.name.endswith("_nginx.log")]

    def wait_up(self, deadline: float) -> float:
        t0 = time.monotonic()
        pending = list(self.ports)
        while pending:
            if any(p.poll() is not None for p in self.procs):
                raise RuntimeError("a server process exited while starting")
            if time.monotonic() > deadline:
                raise RuntimeError("servers did not answer in time")
            port = pending[0]
            try:
                path = "/ready" if self.spec.kind == "parallel" else "/system_stats"
                http(port, path, timeout=5)
                pending.pop(0)
            except (OSError, ValueError):
                time.sleep(0.5)
        return time.monotonic() - t0

    def stop(self) -> None:
        stop_all(self.procs)
        for f in self.files:
            f.close()


# ---------------------------------------------------------------- one server

def warm_up(servers: Servers, args: argparse.Namespace, deadline: float) -> dict:
    """Per worker: each checkpoint once (into host memory and onto the device), the stream shapes (a CUDA graph is
    captured per shape), and one long and one short prompt whose execution times pace stream c. Each worker holds
    the first checkpoint at the end."""
    front = servers.front
    assert front is not None
    subs, targets = [], []
    n = len(servers.ports) if servers.spec.kind == "stock" else servers.args.n_workers
    for w in range(n):
        jobs = [Job(f"w{w}-{c}", txt2img(c, args.size_short, 2, 9000 + i, "warm-up", "aff_w"))
                for i, c in enumerate(args.ckpts[1:] + args.ckpts[:1])]
        jobs += [Job(f"w{w}-b", txt2img(args.ckpts[0], args.size_b, 2, 9100, "warm-up", "aff_w")),
                 Job(f"w{w}-shape", txt2img(args.ckpts[0], args.size_long, 2, 9150, "warm-up", "aff_w")),
                 Job(f"w{w}-long", txt2img(args.ckpts[0], args.size_long, args.steps_long, 9200, "warm-up", "aff_w"),
                     kind="long"),
                 Job(f"w{w}-short", txt2img(args.ckpts[0], args.size_short, args.steps_short, 9300, "warm-up",
                                            "aff_w"), kind="short")]
        for job in jobs:
            sub = Sub(job)
            if servers.spec.kind == "stock":
                front.submit(sub, port=servers.ports[w])
            else:
                front.submit(sub, headers={"X-TARGET-GPU": str(w)})
            subs.append(sub)
            targets.append(w)
    broken = wait_done(front, subs, deadline, servers.procs)
    execs: dict[str, list[float]] = {"long": [], "short": []}
    for s in subs:
        if s.entry is not None and s.job.kind in execs:
            msgs = messages(s.entry)
            start = msgs.get("execution_start", {}).get("timestamp")
            end = msgs.get("execution_success", {}).get("timestamp")
            if start is not None and end is not None:
                execs[s.job.kind].append((end - start) / 1000)
    errors = [s.error or "error" for s in subs if not s.done or s.entry is None
              or (s.entry.get("status") or {}).get("status_str") != "success"]
    return {"prompts": len(subs), "errors": len(errors), "broken": broken,
            "long_s": round(min(execs["long"]), 3) if execs["long"] else None,
            "short_s": round(min(execs["short"]), 3) if execs["short"] else None}


def run_stream(servers: Servers, name: str, args: argparse.Namespace, deadline: float) -> dict:
    front = servers.front
    assert front is not None
    logs = servers.comfy_logs()
    offsets = log_sizes(logs)
    status_before = pool_status(servers)
    subs: list[Sub] = []
    broken: str | None = None
    t0 = time.monotonic()
    if name == "a":
        subs = [Sub(j) for j in stream_a(args, random.Random(args.seed))]
        for s in subs:
            front.submit(s)
        broken = wait_done(front, subs, deadline, servers.procs)
    elif name == "b":
        results: list[str | None] = [None, None]
        per_client: list[list[Sub]] = [[], []]

        def client(c: int) -> None:
            for r in range(args.b_rounds):
                burst = [Sub(j) for j in stream_b_client(args, c, r)]
                for s in burst:
                    front.submit(s)
                per_client[c].extend(burst)
                results[c] = wait_done(front, burst, deadline, servers.procs)
                if results[c]:
                    return

        threads = [threading.Thread(target=client, args=(c,)) for c in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        subs = per_client[0] + per_client[1]
        broken = results[0] or results[1]
    else:
        subs = [Sub(j) for j in stream_c(args, random.Random(args.seed + 2), args.c_gap_s)]
        for s in subs:
            delay = t0 + (s.job.at_s or 0.0) - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            front.submit(s)
        broken = wait_done(front, subs, deadline, servers.procs)
    out = figures(subs, count_loads(logs, offsets))
    out["took_s"] = round(time.monotonic() - t0, 1)
    if name == "c":
        for kind in ("long", "short"):
            part = [s for s in subs if s.job.kind == kind]
            f = figures(part, 0)
            out[f"p95_{kind}_s"] = f.get("p95_s")
    if broken:
        out["broken"] = broken
    after = pool_status(servers)
    if status_before and after:
        out["pool_picks"] = {reason: sum(d["picks"][reason] for d in after["devices"])
                             - sum(d["picks"][reason] for d in status_before["devices"])
                             for reason in ("oldest", "affinity", "slack")}
    return out


def pool_status(servers: Servers) -> dict | None:
    if servers.spec.kind != "parallel":
        return None
    try:
        status = http(servers.ports[0], "/multigpu/status", timeout=10)
    except (OSError, ValueError):
        return None
    pool = status.get("pool") or {}
    if not pool.get("enabled"):
        return None
    return {"devices": [d.get("pool_picks") or {"picks": {"oldest": 0, "affinity": 0, "slack": 0}}
                        for d in status.get("devices", [])]}


def run_server(spec: Spec, args: argparse.Namespace, out: Path, global_deadline: float) -> dict:
    res: dict = {"server": spec.name, "streams": {}}
    budget = args.stock_budget_s if spec.kind == "stock" else args.server_budget_s
    deadline = min(global_deadline, time.monotonic() + budget)
    servers = Servers(spec, args, out)
    print(f"\n[{spec.name}] starting", flush=True)
    t0 = time.monotonic()
    try:
        servers.start()
        res["proxy"] = servers.proxy
        res["cmd"] = [p.args for p in servers.procs]
        res["startup_s"] = round(servers.wait_up(min(deadline, time.monotonic() + args.start_timeout)), 1)
        print(f"[{spec.name}] up in {res['startup_s']} s ({servers.proxy})", flush=True)
        res["warmup"] = warm_up(servers, args, deadline)
        print(f"[{spec.name}] warm-up: {res['warmup']}", flush=True)
        if res["warmup"].get("broken"):
            raise RuntimeError(f"warm-up: {res['warmup']['broken']}")
        if args.c_gap_s is None and res["warmup"].get("long_s") and res["warmup"].get("short_s"):
            mean = (args.c_long * res["warmup"]["long_s"] + args.c_short * res["warmup"]["short_s"]) / (
                args.c_long + args.c_short)
            args.c_gap_s = round(mean / (args.n_workers * args.c_load), 3)
            res["c_gap_s_set_here"] = args.c_gap_s
        for name in spec.streams:
            if deadline - time.monotonic() < args.min_stream_s:
                res["streams"][name] = {"skipped": f"out of time ({deadline - time.monotonic():.0f} s left)"}
                print(f"[{spec.name}] stream {name}: skipped, out of time", flush=True)
                continue
            if name == "c" and args.c_gap_s is None:
                res["streams"][name] = {"skipped": "no warm-up timing to pace the arrivals"}
                continue
            res["streams"][name] = run_stream(servers, name, args, deadline)
            print(f"[{spec.name}] stream {name}: {json.dumps(res['streams'][name])}", flush=True)
        if spec.kind == "parallel":
            try:
                res["multigpu_status"] = http(servers.ports[0], "/multigpu/status", timeout=10)
            except (OSError, ValueError) as err:
                res["multigpu_status"] = f"unavailable: {err}"
    except Exception as err:  # noqa: BLE001 - recorded; the next server still runs
        res["failed"] = f"{type(err).__name__}: {err}"
        print(f"[{spec.name}] FAILED: {res['failed']}", flush=True)
        res["log_tail"] = [line[:300] for p in servers.logs for line in log_tail(p, 30)]
    finally:
        servers.stop()
        res["wall_s"] = round(time.monotonic() - t0, 1)
    return res


# ---------------------------------------------------------------- report

def fmt(v, suffix: str = "") -> str:
    return "-" if v is None else f"{v}{suffix}"


def markdown(results: list[dict], meta: dict) -> str:
    by = {r["server"]: r for r in results}
    base = by.get("auto", {}).get("streams", {})
    budget = "none (CPU workers)" if meta["cpu"] else f"{meta['worker_vram_gib']} GiB per worker"
    lines = [f"ComfyUI {meta.get('comfyui_version', '?')}; --devices {meta['devices']}; checkpoints "
             f"{', '.join(meta['ckpts'])}; VRAM budget {budget}; "
             f"a: {meta['a_prompts']} prompts {meta['size_long']}^2/{meta['steps_long']} steps; b: 2 clients x "
             f"{meta['b_rounds']} rounds x {meta['b_burst']} prompts {meta['size_b']}^2/{meta['steps_b']} steps; "
             f"c: {meta['c_long']} long ({meta['size_long']}^2/{meta['steps_long']}) + {meta['c_short']} short "
             f"({meta['size_short']}^2/{meta['steps_short']}), mean gap {meta.get('c_gap_s')} s", "",
             "| stream | server | prompts | errors | img/s (vs auto) | p50 s | p95 s | loads / 100 prompts (vs auto) | "
             "cached text encodes | longest wait s | per worker | pool picks |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for stream in STREAMS:
        for r in results:
            f = r.get("streams", {}).get(stream)
            if f is None:
                continue
            if "skipped" in f:
                lines.append(f"| {stream} | {r['server']} | skipped: {f['skipped']} |" + " |" * 9)
                continue
            ref = base.get(stream, {})
            rate = fmt(f.get("img_per_s"))
            if f.get("img_per_s") and ref.get("img_per_s") and r["server"] != "auto":
                rate += f" ({f['img_per_s'] / ref['img_per_s']:.2f}x)"
            loads = fmt(f.get("loads_per_100"))
            if ref.get("loads_per_100") and r["server"] != "auto" and f.get("loads_per_100") is not None:
                loads += f" ({f['loads_per_100'] / ref['loads_per_100']:.2f}x)"
            cache = f"{f.get('cached_text_encodes', '-')} ({fmt(f.get('cache_hit_pct'), '%')})"
            p95 = fmt(f.get("p95_s"))
            if stream == "c":
                p95 += f" (long {fmt(f.get('p95_long_s'))}, short {fmt(f.get('p95_short_s'))})"
            name = r["server"] + (f" [{r['proxy']}]" if r.get("proxy", "-") != "-" else "")
            errors = f"{f['errors']}" + (f" ({f['broken']})" if "broken" in f else "")
            lines.append(f"| {stream} | {name} | {f['prompts']} | {errors} | {rate} | {fmt(f.get('p50_s'))} | {p95} | "
                         f"{loads} | {cache} | {fmt(f.get('longest_wait_s'))} | {f.get('per_worker', '-')} | "
                         f"{f.get('pool_picks', '-')} |")
    lines += ["", "Goals (issue 16): " + "; ".join(goals(by, meta))]
    for r in results:
        if "failed" in r:
            lines += ["", f"{r['server']} failed: {r['failed']}", "```", *r.get("log_tail", [])[-30:], "```"]
    return "\n".join(lines)


def goals(by: dict, meta: dict) -> list[str]:
    def s(server: str, stream: str) -> dict:
        return by.get(server, {}).get("streams", {}).get(stream, {})

    out = []
    pa, aa = s("pool", "a"), s("auto", "a")
    if pa.get("img_per_s") and aa.get("img_per_s"):
        ratio = pa["img_per_s"] / aa["img_per_s"]
        loads = (pa["loads_per_100"] / aa["loads_per_100"]) if aa.get("loads_per_100") else None
        verdict = "no loads to compare" if loads is None else "met" if loads <= 1 / 3 else "NOT met"
        out.append(f"a: img/s {ratio:.2f}x auto (goal >= 1.3: {'met' if ratio >= 1.3 else 'NOT met'}), loads "
                   f"{fmt(round(loads, 2) if loads is not None else None)}x auto (goal <= 0.33: {verdict})")
    pb = s("pool", "b")
    if pb.get("cache_hit_pct") is not None:
        out.append(f"b: cached text encodes on {pb['cache_hit_pct']}% of prompts (goal >= 90%: "
                   f"{'met' if pb['cache_hit_pct'] >= 90 else 'NOT met'})")
    pc, ac = s("pool", "c"), s("auto", "c")
    if pc.get("p95_s") is not None and ac.get("p95_s") is not None:
        out.append(f"c: p95 {pc['p95_s']} s vs auto {ac['p95_s']} s (goal <=: "
                   f"{'met' if pc['p95_s'] <= ac['p95_s'] else 'NOT met'})")
    fa = s("fifo", "a")
    if pa.get("longest_wait_s") is not None and fa.get("longest_wait_s") is not None:
        bound = fa["longest_wait_s"] + meta["slack"] * (fa.get("mean_exec_s") or 0) / max(1, meta["n_workers"])
        out.append(f"a: longest wait {pa['longest_wait_s']} s vs FIFO {fa['longest_wait_s']} s + slack {meta['slack']}"
                   f" x mean job {fa.get('mean_exec_s')} s / {meta['n_workers']} workers = {bound:.2f} s "
                   f"({'met' if pa['longest_wait_s'] <= bound else 'NOT met'})")
    return out or ["not enough servers ran to check them"]


# ---------------------------------------------------------------- main

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--comfyui", default="/tmp/comfyui")
    ap.add_argument("--frontend", default=str(REPO / ".device" / "frontend"))
    ap.add_argument("--ckpt-dir", required=True, help="folder of the checkpoints (given to every server)")
    ap.add_argument("--ckpts", default="sdxl_a.safetensors,sdxl_b.safetensors,sdxl_c.safetensors")
    ap.add_argument("--devices", default="0*2", help="comfy-parallel --devices; stock runs one process per entry")
    ap.add_argument("--servers", default="pool,auto,stock,fifo:a")
    ap.add_argument("--cpu", action="store_true", help="CPU smoke test: CPU workers, tiny sizes")
    ap.add_argument("--worker-vram-gib", type=float, default=12.0)
    ap.add_argument("--slack", type=int, default=None, help="pool's --affinity-slack (default: the server's)")
    ap.add_argument("--a-prompts", type=int, default=16)
    ap.add_argument("--b-rounds", type=int, default=15)
    ap.add_argument("--b-burst", type=int, default=1)
    ap.add_argument("--c-long", type=int, default=6)
    ap.add_argument("--c-short", type=int, default=18)
    ap.add_argument("--c-load", type=float, default=0.85, help="stream c's arrival rate over the workers' capacity")
    ap.add_argument("--c-gap-s", type=float, default=None, help="mean gap between stream c arrivals (default: "
                    "from the first server's warm-up and --c-load)")
    ap.add_argument("--size-long", type=int, default=1024)
    ap.add_argument("--steps-long", type=int, default=20)
    ap.add_argument("--size-short", type=int, default=512)
    ap.add_argument("--steps-short", type=int, default=4)
    ap.add_argument("--size-b", type=int, default=768)
    ap.add_argument("--steps-b", type=int, default=12)
    ap.add_argument("--seed", type=int, default=16)
    ap.add_argument("--nginx", default=None, help="nginx binary (default: nginx on PATH or /usr/sbin/nginx)")
    ap.add_argument("--port", type=int, default=8488)
    ap.add_argument("--start-timeout", type=float, default=180)
    ap.add_argument("--min-stream-s", type=float, default=20)
    ap.add_argument("--server-budget-s", type=float, default=150, help="most seconds one comfy-parallel server "
                    "may take")
    ap.add_argument("--stock-budget-s", type=float, default=230, help="most seconds the stock server may take (its "
                    "model swaps read the checkpoint again)")
    ap.add_argument("--budget-s", type=float, default=440, help="most seconds for all servers together")
    ap.add_argument("--out", default=os.environ.get("OUT") or "bench/results/affinity_local")
    args = ap.parse_args()
    t_start = time.monotonic()
    args.ckpts = [c for c in args.ckpts.split(",") if c]
    if len(args.ckpts) != 3:
        raise SystemExit("--ckpts: give three checkpoint names")
    missing = [c for c in args.ckpts if not (Path(args.ckpt_dir) / c).exists()]
    if missing:
        raise SystemExit(f"--ckpt-dir {args.ckpt_dir} lacks {missing}")
    if args.cpu:
        for name, value in (("size_long", 64), ("steps_long", 2), ("size_short", 64), ("steps_short", 1),
                            ("size_b", 64), ("steps_b", 1)):
            if getattr(args, name) == ap.get_default(name):
                setattr(args, name, value)
        if args.devices == ap.get_default("devices"):
            args.devices = "cpu,cpu"
    sys.path.insert(0, str(REPO))
    from comfy_parallel.settings import DEFAULT_SLACK, parse_devices

    args.n_workers = len(parse_devices(args.devices))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    args.extra_paths = out / "extra_model_paths.yaml"
    args.extra_paths.write_text(f"affinity_bench:\n    base_path: {Path(args.ckpt_dir).resolve()}\n"
                                f"    checkpoints: {Path(args.ckpt_dir).resolve()}\n")
    specs = parse_servers(args.servers)
    if args.slack is not None:
        for spec in specs:
            if spec.name == "pool":
                spec.serve_args += ["--affinity-slack", str(args.slack)]
    meta = {k: getattr(args, k) for k in ("devices", "ckpts", "worker_vram_gib", "a_prompts", "b_rounds", "b_burst",
                                          "c_long", "c_short", "c_load", "size_long", "steps_long", "size_short",
                                          "steps_short", "size_b", "steps_b", "seed", "n_workers", "cpu")}
    meta.update(servers=[s.name for s in specs], slack=args.slack if args.slack is not None else DEFAULT_SLACK,
                python=sys.version.split()[0], host=platform.node(), started=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                argv=sys.argv[1:])
    try:
        meta["comfyui_version"] = (Path(args.comfyui) / "comfyui_version.py").read_text().split('"')[1]
    except (OSError, IndexError):
        pass
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    global_deadline = t_start + args.budget_s
    results: list[dict] = []
    for spec in specs:
        if global_deadline - time.monotonic() < 40:
            results.append({"server": spec.name, "skipped": "out of time", "streams": {}})
            print(f"[{spec.name}] skipped: out of time", flush=True)
            continue
        results.append(run_server(spec, args, out, global_deadline))
        meta["c_gap_s"] = args.c_gap_s
        (out / "affinity.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    md = markdown([r for r in results if "skipped" not in r], meta)
    skipped = [r["server"] for r in results if "skipped" in r]
    if skipped:
        md += f"\n\nNot run (out of time): {', '.join(skipped)}"
    (out / "affinity.md").write_text(md + "\n")
    print("\nTABLE\n" + md, flush=True)
    ok = all("failed" not in r and "skipped" not in r and all(
        f.get("errors", 0) == 0 and "broken" not in f for f in r.get("streams", {}).values()) for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
