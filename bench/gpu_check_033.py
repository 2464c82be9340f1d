"""GPU check for ComfyUI 0.33: a varied workflow set (bench/workflows.py) on stock ComfyUI and on comfy-parallel.

Per server, in turn (never two at once): start it, run the identity set twice (round 1 warms up: stock's first
image of a kind after a start can differ from its later ones; round 2 is compared), then the throughput workloads
W1 (SD1.5 512x512) and W2 (SDXL 1024x1024), 20 steps, euler, batch 1, many prompts at once so every worker is busy
(after one warm-up prompt per worker). Measures: errors (the first one's message, node and traceback), each image's
pixels against the first server's (normally stock) for the same (workflow, seed), img/s, host RSS (VmRSS after the
run, VmHWM peak) and GPU memory (nvidia-smi: after the run and the peak of 1 s samples).

Servers (--servers, comma list): ``stock`` or ``parallel`` followed by modifiers joined with '-':
  nodvram   ComfyUI's --disable-dynamic-vram (DynamicVRAM is 0.33's default on CUDA; comfy-parallel with several
            CUDA workers adds it by itself)
  dvram     comfy-parallel through bench/serve_dynamic_vram.py: its DynamicVRAM guard off, ComfyUI's default kept
  pagecache comfy-parallel --host-copy page-cache
  noshared  comfy-parallel --shared-weights off
  nographs  comfy-parallel --cuda-graphs off
  si05      comfy-parallel --switch-interval-ms 0.5 (GPU throughput with a short GIL switch interval)
  cm        ComfyUI's --cuda-malloc (cudaMallocAsync; comfy-parallel with graphs on several CUDA workers otherwise
            adds --disable-cuda-malloc)
  nocm      ComfyUI's --disable-cuda-malloc (torch's native allocator), stock or comfy-parallel
  identonly skip W1/W2 (identity set only)
  noident   skip the identity set (throughput workloads only)
e.g. ``stock,parallel,parallel-dvram,stock-nodvram-identonly,parallel-pagecache``. Images are compared with the
first server's and with every other stock server's.

usage (device machine, repo root, PYTHONPATH holding the repo and the carried packages):
    python3 bench/gpu_check_033.py --comfyui /tmp/comfyui --devices '0*2' --out $OUT
local smoke test on CPU (tiny sizes, SD1.5 only, two CPU workers):
    python bench/gpu_check_033.py --comfyui DIR --devices cpu,cpu --tiny --archs sd15 --steps 1 \
        --w-prompts 2 --servers stock,parallel
"""

from __future__ import annotations

import argparse
import hashlib
import io
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
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import workflows as wfs  # noqa: E402
from gpu_check import exec_seconds, http, log_tail, stop_all, sum_status_gib  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
MODIFIERS = {"nodvram", "dvram", "pagecache", "noshared", "nographs", "identonly", "noident", "cm", "nocm", "si05"}


# ---------------------------------------------------------------- servers

@dataclass
class ServerSpec:
    name: str
    cmd: list[str]
    port: int
    workers: int
    throughput: bool = True
    identity: bool = True


def server_specs(names: list[str], args: argparse.Namespace, workers: int) -> list[ServerSpec]:
    """Commands of the named servers (see the module docstring); each gets its own port."""
    common = ["--listen", "127.0.0.1", "--disable-auto-launch", "--disable-api-nodes",
              "--front-end-root", str(Path(args.frontend).resolve())]
    if args.cpu:
        common.append("--cpu")
    specs = []
    for i, name in enumerate(names):
        base, *mods = name.split("-")
        unknown = [m for m in mods if m not in MODIFIERS]
        if base not in ("stock", "parallel") or unknown:
            raise SystemExit(f"bad server name {name!r}: stock|parallel, then modifiers {sorted(MODIFIERS)}")
        port = args.port + i
        comfy_extra = ["--disable-dynamic-vram"] if "nodvram" in mods else []
        if "cm" in mods and "nocm" in mods:
            raise SystemExit(f"{name}: cm or nocm, not both")
        comfy_extra += ["--cuda-malloc"] if "cm" in mods else ["--disable-cuda-malloc"] if "nocm" in mods else []
        if base == "stock":
            if {"pagecache", "noshared", "nographs", "dvram", "si05"} & set(mods):
                raise SystemExit(f"{name}: pagecache/noshared/nographs/dvram/si05 apply to comfy-parallel only")
            cmd = [sys.executable, str(Path(args.comfyui) / "main.py"), *common, *comfy_extra, "--port", str(port)]
            n = 1
        else:
            cp_extra = []
            if "pagecache" in mods:
                cp_extra += ["--host-copy", "page-cache"]
            if "noshared" in mods:
                cp_extra += ["--shared-weights", "off"]
            if "si05" in mods:
                cp_extra += ["--switch-interval-ms", "0.5"]
            if "nographs" in mods:
                cp_extra += ["--cuda-graphs", "off"]
            if "dvram" in mods and "nodvram" in mods:
                raise SystemExit(f"{name}: dvram or nodvram, not both")
            launcher = [str(REPO / "bench" / "serve_dynamic_vram.py")] if "dvram" in mods else \
                ["-m", "comfy_parallel", "serve"]
            cmd = [sys.executable, *launcher, "--comfyui", args.comfyui,
                   "--devices", args.devices, "--entry-ports", "none", *cp_extra,
                   "--", *common, *comfy_extra, "--port", str(port)]
            n = workers
        specs.append(ServerSpec(name, cmd, port, n, throughput="identonly" not in mods,
                                identity="noident" not in mods))
    return specs


def probed(wf: dict) -> dict:
    """The prompt with each KSampler's model passed through a ProbeUNetCalls node labelled by prompt and sampler."""
    wf = json.loads(json.dumps(wf))
    prefix = next(n["inputs"]["filename_prefix"] for n in wf.values() if n["class_type"] == "SaveImage")
    for node_id, node in list(wf.items()):
        if node["class_type"] == "KSampler":
            probe_id = f"probe{node_id}"
            wf[probe_id] = {"class_type": "ProbeUNetCalls",
                            "inputs": {"model": node["inputs"]["model"], "label": f"{prefix}_k{node_id}"}}
            node["inputs"]["model"] = [probe_id, 0]
    return wf


class GpuMemSampler(threading.Thread):
    """Peak GPU memory used (MiB, per GPU) from nvidia-smi once a second; idle when there is no nvidia-smi."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak: list[int] | None = None
        self.stop_flag = threading.Event()

    def run(self) -> None:
        while not self.stop_flag.is_set():
            now = gpu_memory_used()
            if now is None:
                return
            self.peak = now if self.peak is None else [max(a, b) for a, b in zip(self.peak, now)]
            self.stop_flag.wait(1.0)


def gpu_memory_used() -> list[int] | None:
    """MiB used per GPU (None without nvidia-smi). Unlike gpu_check's, quiet when the binary is missing."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20).stdout
        return [int(x) for x in out.split()] or None
    except (OSError, ValueError, subprocess.SubprocessError):
        return None


# ---------------------------------------------------------------- prompts and outcomes

@dataclass
class Outcome:
    """What became of one submitted prompt."""

    key: str
    status: str = "pending"                   # success | error | rejected | lost
    error: dict | None = None
    images: list = field(default_factory=list)  # numpy uint8 arrays, one per saved image
    exec_s: float | None = None
    gpu_id: int | None = None
    submitted_t: float = 0.0
    done_t: float = 0.0


def execution_error(entry: dict) -> dict | None:
    """The execution_error message of a history entry: node, exception and traceback."""
    for msg in (entry.get("status") or {}).get("messages", []):
        if isinstance(msg, list) and len(msg) == 2 and msg[0] == "execution_error":
            body = msg[1]
            return {"node_type": body.get("node_type"), "node_id": body.get("node_id"),
                    "exception_type": body.get("exception_type"), "message": body.get("exception_message"),
                    "traceback": "".join(body.get("traceback") or [])[-6000:]}
    return None


def fetch_images(port: int, entry: dict) -> list:
    """The SaveImage node's images as RGB uint8 arrays (pixels only: the PNG text chunks hold the prompt)."""
    import numpy as np
    from PIL import Image

    arrays = []
    for img in entry["outputs"][wfs.SAVE_NODE]["images"]:
        url = (f"http://127.0.0.1:{port}/view?filename={urllib.parse.quote(img['filename'])}"
               f"&subfolder={urllib.parse.quote(img['subfolder'])}&type={img['type']}")
        data = urllib.request.urlopen(url, timeout=30).read()
        arrays.append(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
    return arrays


class ServerDied(RuntimeError):
    pass


def run_batch(port: int, proc: subprocess.Popen, prompts: list[tuple[str, dict]], timeout: float,
              stall_s: float) -> tuple[list[Outcome], str | None]:
    """Submit every prompt at once (so every worker has work), poll /history until all are done, then fetch the
    images (after the timing, so fetching does not delay it). Returns the outcomes in submission order and, when
    the server died or stalled (no prompt finished for ``stall_s``), why: the prompts that were pending are
    then 'lost', and what finished before is kept (an error that preceded a crash is the interesting part)."""
    outcomes: dict[str, Outcome] = {}
    order: list[str] = []
    entries: dict[str, dict] = {}
    broken: str | None = None
    for key, prompt in prompts:
        out = Outcome(key, submitted_t=time.monotonic())
        try:
            reply = http(port, "/prompt", {"prompt": prompt, "client_id": "gpu-check-033"})
        except urllib.error.HTTPError as err:
            out.status, out.error = "rejected", {"message": f"/prompt answered {err.code}: {err.read()[:3000]!r}"}
            outcomes[f"rejected:{key}"] = out
            order.append(f"rejected:{key}")
            continue
        except OSError as err:
            broken = f"/prompt failed: {err}"
            break
        outcomes[reply["prompt_id"]] = out
        order.append(reply["prompt_id"])
    deadline = time.monotonic() + timeout
    last_progress = time.monotonic()
    pending = {pid for pid, o in outcomes.items() if o.status == "pending"}
    while pending and broken is None:
        now = time.monotonic()
        if proc.poll() is not None:
            broken = f"server exited with {proc.returncode} while {len(pending)} prompts were pending"
            break
        if now > deadline:
            for pid in pending:
                outcomes[pid].status, outcomes[pid].error = "lost", {"message": f"not done after {timeout:.0f}s"}
            pending = set()
            break
        if now - last_progress > stall_s:
            broken = f"stalled: no prompt finished in {stall_s:.0f}s, {len(pending)} pending"
            break
        try:
            hist = http(port, "/history", timeout=30)
        except OSError as err:
            broken = f"/history failed: {err}"
            break
        now = time.monotonic()
        for pid in list(pending):
            entry = hist.get(pid)
            status = (entry or {}).get("status") or {}
            if entry is None or not (status.get("completed") or status.get("status_str") in ("success", "error")):
                continue
            pending.discard(pid)
            last_progress = now
            out = outcomes[pid]
            out.done_t, out.exec_s, out.gpu_id = now, exec_seconds(entry), entry.get("gpu_id")
            if status.get("status_str") == "success":
                entries[pid] = entry
            else:
                out.status = "error"
                out.error = execution_error(entry) or {"message": json.dumps(status)[:3000]}
        time.sleep(0.1)
    for pid in pending:
        outcomes[pid].status, outcomes[pid].error = "lost", {"message": broken or "lost"}
    for pid, entry in entries.items():
        out = outcomes[pid]
        try:
            out.images = fetch_images(port, entry)
            out.status = "success"
        except Exception as err:  # noqa: BLE001 - an unreadable output is recorded, the run goes on
            out.status, out.error = "error", {"message": f"image fetch: {type(err).__name__}: {err}"}
    return [outcomes[pid] for pid in order], broken


# ---------------------------------------------------------------- comparison

def digest(img) -> str:
    return hashlib.sha256(str(img.shape).encode() + img.tobytes()).hexdigest()[:16]


def compare(ref: list, got: list) -> dict:
    """Pixel comparison of one prompt's images with the reference's: identical, or how far apart."""
    import numpy as np

    if len(ref) != len(got):
        return {"identical": False, "note": f"{len(got)} images vs {len(ref)}"}
    if any(a.shape != b.shape for a, b in zip(ref, got)):
        return {"identical": False, "note": "shapes differ"}
    diffs = [np.abs(a.astype(np.int16) - b.astype(np.int16)) for a, b in zip(ref, got)]
    max_diff = int(max(d.max() for d in diffs))
    return {"identical": max_diff == 0, "max_diff": max_diff,
            "mean_diff": round(float(sum(d.mean() for d in diffs) / len(diffs)), 4)}


# ---------------------------------------------------------------- one server

def run_server(spec: ServerSpec, args: argparse.Namespace, archs: dict[str, wfs.Arch], out: Path,
               global_deadline: float) -> tuple[dict, dict[str, dict[str, list]]]:
    """Start the server, run its phases within its time, stop it. Returns (result, images by phase and key)."""
    res: dict = {"server": spec.name, "cmd": spec.cmd, "workers": spec.workers, "log": f"{spec.name}.log",
                 "phases": {}, "errors": 0}
    images: dict[str, dict[str, list]] = {}
    deadline = min(global_deadline, time.monotonic() + args.server_budget_s)
    env = dict(os.environ, PYTHONUNBUFFERED="1", NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1",
               NVSHMEM_DISABLE_NVLS="1")
    log_path = out / res["log"]
    log = open(log_path, "w")
    print(f"\n[{spec.name}] starting: {' '.join(spec.cmd)}", flush=True)
    gpu_before = gpu_memory_used()
    t0 = time.monotonic()
    proc = subprocess.Popen(spec.cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(REPO))
    gpu = GpuMemSampler()
    gpu.start()

    def left() -> float:
        return deadline - time.monotonic()

    def phase(name: str, prompts: list[tuple[str, dict]], min_s: float = 15) -> list[Outcome] | None:
        if left() < min_s:
            res["phases"][name] = {"skipped": f"out of time ({left():.0f}s left)"}
            print(f"[{spec.name}] {name}: skipped, {left():.0f}s left", flush=True)
            return None
        t = time.monotonic()
        outs, broken = run_batch(spec.port, proc, prompts, left(), args.stall_s)
        wall = max((o.done_t for o in outs if o.done_t), default=time.monotonic()) - t
        errs = [o for o in outs if o.status != "success"]
        info = {"prompts": len(outs), "errors": len(errs), "wall_s": round(wall, 3),
                "images": sum(len(o.images) for o in outs),
                "per_worker": count_by(o.gpu_id for o in outs)}
        execs = [o.exec_s for o in outs if o.exec_s is not None]
        if execs:
            info["exec_mean_s"] = round(sum(execs) / len(execs), 3)
        if errs:
            info["first_error"] = {"key": errs[0].key, "status": errs[0].status, **(errs[0].error or {})}
            info["error_keys"] = [o.key for o in errs]
        res["phases"][name] = info
        res["errors"] += len(errs)
        images[name] = {o.key: o.images for o in outs if o.status == "success"}
        if broken:
            info["broken"] = broken
        first = info.get("first_error", {})
        print(f"[{spec.name}] {name}: {len(outs)} prompts in {wall:.1f}s, {len(errs)} errors"
              + (f"; first: {first.get('exception_type')}: {str(first.get('message'))[:300]}" if errs else ""),
              flush=True)
        if broken:
            raise ServerDied(f"{name}: {broken}")
        return outs

    try:
        while True:
            if proc.poll() is not None:
                raise ServerDied(f"server exited with {proc.returncode} before answering")
            if left() < 0 or time.monotonic() - t0 > args.start_timeout:
                raise ServerDied("server did not answer /system_stats in time")
            try:
                stats = http(spec.port, "/system_stats", timeout=5)
                break
            except (OSError, ValueError):
                time.sleep(0.5)
        res["startup_s"] = round(time.monotonic() - t0, 2)
        res["comfyui_version"] = (stats.get("system") or {}).get("comfyui_version")
        res["rss_idle_gib"] = sum_status_gib([proc.pid], "VmRSS")
        print(f"[{spec.name}] up in {res['startup_s']}s, ComfyUI {res['comfyui_version']}", flush=True)

        cases = wfs.identity_set(args.ident_archs, args.kinds) if spec.identity else []
        for rnd in (1, 2) if cases else ():
            prompts = [(c.key, wfs.build(c.kind, archs[c.arch], args.steps, c.seed,
                                         f"{spec.name}_r{rnd}_{c.arch}_{c.kind}", round_tag=rnd)) for c in cases]
            if args.probe:
                prompts = [(key, probed(wf)) for key, wf in prompts]
            phase(f"ident_r{rnd}", prompts, min_s=30)
        if cases:
            res["rss_after_ident_gib"] = sum_status_gib([proc.pid], "VmRSS")

        if spec.throughput:
            for label, arch, size, n in (("W1", "sd15", args.w1_size, args.w_prompts),
                                         ("W2", "sdxl", args.w2_size, args.w2_prompts)):
                if arch not in archs or label not in args.workloads:
                    continue
                ckpt = archs[arch].ckpt
                warm = [(f"warm{i}", wfs.txt2img(ckpt, size, size, args.w_steps, 9001 + i, f"{spec.name}_{label}w",
                                                 round_tag=3)) for i in range(max(1, spec.workers))]
                if phase(f"{label}_warmup", warm, min_s=20) is None:
                    continue
                runs = [(f"seed{s}", wfs.txt2img(ckpt, size, size, args.w_steps, s, f"{spec.name}_{label}"))
                        for s in range(1, n + 1)]
                outs = phase(label, runs, min_s=20)
                if outs:
                    info = res["phases"][label]
                    ok = [o for o in outs if o.status == "success"]
                    if ok:
                        wall = max(o.done_t for o in ok) - min(o.submitted_t for o in outs)
                        info["img_per_s"] = round(len(ok) / wall, 4)
        time.sleep(2)  # let the last prompt's cleanup (page-cache drops, cache trims) finish before reading RSS
        res["rss_after_gib"] = sum_status_gib([proc.pid], "VmRSS")
        res["rss_peak_gib"] = sum_status_gib([proc.pid], "VmHWM")
        res["gpu_mem_after_mib"] = gpu_memory_used()
        if spec.name.startswith("parallel"):
            try:
                res["multigpu_status"] = http(spec.port, "/multigpu/status", timeout=10)
            except (OSError, ValueError) as err:
                res["multigpu_status"] = f"unavailable: {err}"
    except ServerDied as err:
        res["died"] = str(err)
        print(f"[{spec.name}] DIED: {err}", flush=True)
    except Exception as err:  # noqa: BLE001 - recorded; the next server still runs
        res["failed"] = f"{type(err).__name__}: {err}"
        print(f"[{spec.name}] FAILED: {res['failed']}", flush=True)
    finally:
        gpu.stop_flag.set()
        res["gpu_mem_before_mib"] = gpu_before
        res["gpu_mem_peak_mib"] = gpu.peak
        stop_all([proc])
        res["exit_code"] = proc.returncode
        log.close()
        res["wall_s"] = round(time.monotonic() - t0, 1)
        if "died" in res or "failed" in res:
            res["log_tail"] = [line[:300] for line in log_tail(log_path, 60)]
            print(f"[{spec.name}] last log lines:\n  " + "\n  ".join(res["log_tail"]), flush=True)
    return res, images


def count_by(values) -> dict[str, int]:
    counts: dict[str, int] = {}
    for v in values:
        counts[str(v)] = counts.get(str(v), 0) + 1
    return dict(sorted(counts.items()))


# ---------------------------------------------------------------- report

OWN = "own r1 vs r2"


def identity_report(results: list[dict], images: dict[str, dict], ref: str) -> dict:
    """Per server and phase: each key's comparison with server ``ref``'s same phase and key; under OWN, the
    reference's warm-up round against its own round 2 (does its first image of a kind after a start differ?)."""
    report: dict = {}
    ref_imgs = images.get(ref, {})
    if "ident_r1" in ref_imgs and "ident_r2" in ref_imgs:
        report[OWN] = {"ident_r2": {k: compare(ref_imgs["ident_r2"][k], v)
                                    for k, v in ref_imgs["ident_r1"].items() if k in ref_imgs["ident_r2"]}}
    for r in results:
        name = r["server"]
        if name == ref or name not in images:
            continue
        per_phase = {}
        for ph in ("ident_r2", "ident_r1", "W1", "W2"):
            got, want = images[name].get(ph), ref_imgs.get(ph)
            if not want or got is None:
                continue
            per_phase[ph] = {k: (compare(want[k], got[k]) if k in got else {"identical": False, "note": "error"})
                             for k in want}
        report[name] = per_phase
    return report


def fmt_cmp(c: dict | None) -> str:
    if c is None:
        return "-"
    if c.get("identical"):
        return "="
    if "max_diff" in c:
        return f"d{c['max_diff']}"
    return c.get("note", "x")


def count_same(per_phase: dict, phases: tuple[str, ...] = ("ident_r2", "W1", "W2")) -> str:
    cells = []
    for ph in phases:
        cmp_ = per_phase.get(ph)
        if cmp_:
            n_same = sum(1 for c in cmp_.values() if c.get("identical"))
            cells.append(f"{ph.replace('ident_', '')} {n_same}/{len(cmp_)}")
    return ", ".join(cells) or "-"


def markdown(results: list[dict], reports: dict[str, dict], meta: dict) -> str:
    """The summary table (vs the first server), one per-workflow table per stock reference, errors, deaths."""
    ref = results[0]["server"]
    by = {r["server"]: r for r in results}
    base = by[ref].get("phases", {})

    def rate(r: dict, label: str) -> str:
        ph = r.get("phases", {}).get(label, {})
        if "img_per_s" not in ph:
            return ph.get("skipped", "-") if ph else "-"
        ref_rate = base.get(label, {}).get("img_per_s")
        ratio = f" ({ph['img_per_s'] / ref_rate:.2f}x)" if ref_rate and r["server"] != ref else ""
        return f"{ph['img_per_s']:.3f}{ratio}"

    def gib(r: dict, field_: str) -> str:
        v, ref_v = r.get(field_), by[ref].get(field_)
        if v is None:
            return "-"
        return f"{v:.2f}" + (f" ({v / ref_v:.2f}x)" if ref_v and r["server"] != ref else "")

    lines = [f"ComfyUI {meta.get('comfyui_version')}; comfy-parallel --devices {meta['devices']}; identity set: "
             f"{len(meta['kinds'])} kinds x {', '.join(meta['archs'])}, {meta['steps']} steps, round 1 warm-up, "
             f"round 2 compared; W1/W2: {meta['w_prompts']}/{meta['w2_prompts']} prompts of {meta['w_steps']} "
             f"steps after one warm-up prompt per worker", "",
             f"| server | up s | errors | identical to {ref} (prompts) | W1 img/s | W2 img/s | RSS after identity set "
             "GiB | RSS at end GiB | peak RSS GiB | VRAM at end MiB | VRAM peak MiB | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        status = r.get("died") or r.get("failed")
        errs = f"{r['errors']}" + (f" + {'died' if 'died' in r else 'failed'}" if status else "")
        same = "ref" if r["server"] == ref else count_same(reports.get(ref, {}).get(r["server"], {}))
        lines.append(f"| {r['server']} | {r.get('startup_s', '-')} | {errs} | {same} | {rate(r, 'W1')} | "
                     f"{rate(r, 'W2')} | {gib(r, 'rss_after_ident_gib')} | {gib(r, 'rss_after_gib')} | "
                     f"{gib(r, 'rss_peak_gib')} | {r.get('gpu_mem_after_mib') or '-'} | "
                     f"{r.get('gpu_mem_peak_mib') or '-'} | {r.get('wall_s')} |")
    for rname, rep in reports.items():
        cols = [n for n in rep if n != OWN]
        heads = ([f"{rname} r1"] if OWN in rep else []) + cols
        keys = sorted({k for per in rep.values() for k in per.get("ident_r2", {})})
        if not keys or not heads:
            continue
        lines += ["", f"Round 2 images vs {rname}'s round 2 ('=' identical; dN: max |pixel difference| N of 255; "
                      f"'error': no image){f'; {rname} r1: its own warm-up round' if OWN in rep else ''}", "",
                  "| workflow | " + " | ".join(heads) + " |", "|---|" + "---|" * len(heads)]
        for k in keys:
            cells = [fmt_cmp(rep[n].get("ident_r2", {}).get(k)) for n in ([OWN] if OWN in rep else []) + cols]
            lines.append(f"| {k} | " + " | ".join(cells) + " |")
        for n in cols:
            w = count_same(rep[n], ("W1", "W2"))
            if w != "-":
                lines.append(f"\n{n} vs {rname}, throughput images per seed: {w}")
    errs = [(r["server"], ph, info["first_error"]) for r in results for ph, info in r.get("phases", {}).items()
            if "first_error" in info]
    if errs:
        lines += ["", "First error per server and phase:"]
        seen = set()
        for name, ph, e in errs:
            lines.append(f"- {name} {ph} ({e.get('key')}; {len(by[name]['phases'][ph].get('error_keys', []))} "
                         f"errors): {e.get('node_type') or ''} {e.get('exception_type') or ''}: "
                         f"{str(e.get('message'))[:400]}")
            if name not in seen and e.get("traceback"):
                seen.add(name)
                lines.append("  ```\n  " + "\n  ".join(e["traceback"].strip().splitlines()[-25:]) + "\n  ```")
    for r in results:
        if "died" in r or "failed" in r:
            lines += ["", f"{r['server']}: {r.get('died') or r.get('failed')}; last log lines:", "```",
                      *r.get("log_tail", [])[-40:], "```"]
    return "\n".join(lines)


def references(results: list[dict], images: dict[str, dict]) -> list[str]:
    """The servers others are compared with: the first one, then every other stock server that ran."""
    names = [r["server"] for r in results if r["server"] in images]
    return [n for i, n in enumerate(names) if i == 0 or n.startswith("stock")]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--comfyui", default="/tmp/comfyui")
    ap.add_argument("--frontend", default=str(REPO / ".device" / "frontend"))
    ap.add_argument("--devices", default="0*2", help="comfy-parallel --devices (cpu,cpu for a CPU smoke test)")
    ap.add_argument("--servers", default="stock,parallel,parallel-dvram,parallel-pagecache,stock-nodvram-identonly")
    ap.add_argument("--archs", default="sd15,sdxl")
    ap.add_argument("--kinds", default=",".join(wfs.KINDS), help="workflow kinds of the identity set")
    ap.add_argument("--ident-archs", help="model families of the identity set (default: --archs)")
    ap.add_argument("--workloads", default="W1,W2", help="throughput workloads to run (W1 SD1.5, W2 SDXL)")
    ap.add_argument("--probe", action="store_true",
                    help="wrap every KSampler's model in ProbeUNetCalls (bench/probe_nodes, installed into ComfyUI's "
                         "custom_nodes by gpu_check_033.sh PROBE=1): per-UNet-call digests under output/probe/")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke-test sizes for the identity set and W1/W2")
    ap.add_argument("--steps", type=int, default=10, help="steps of the identity set")
    ap.add_argument("--w-steps", type=int, default=20)
    ap.add_argument("--w-prompts", type=int, default=16, help="measured W1 prompts per server")
    ap.add_argument("--w2-prompts", type=int, help="measured W2 prompts per server (default: --w-prompts)")
    ap.add_argument("--w1-size", type=int)
    ap.add_argument("--w2-size", type=int)
    ap.add_argument("--port", type=int, default=8388)
    ap.add_argument("--start-timeout", type=float, default=180)
    ap.add_argument("--stall-s", type=float, default=75, help="a server with no prompt finished this long is hung")
    ap.add_argument("--server-budget-s", type=float, default=240, help="most seconds one server may take")
    ap.add_argument("--budget-s", type=float, default=480, help="most seconds for all servers together")
    ap.add_argument("--out", default=os.environ.get("OUT") or "bench/results/local_033")
    args = ap.parse_args()
    t_start = time.monotonic()
    args.cpu = args.devices.replace(" ", "").startswith("cpu")
    args.kinds = tuple(k for k in args.kinds.split(",") if k)
    unknown = [k for k in args.kinds if k not in wfs.KINDS]
    if unknown:
        raise SystemExit(f"unknown kinds {unknown}; known: {', '.join(wfs.KINDS)}")
    table = wfs.TINY if args.tiny else wfs.ARCHS
    archs = {a: table[a] for a in args.archs.split(",") if a}
    args.ident_archs = [a for a in (args.ident_archs or args.archs).split(",") if a in archs]
    args.workloads = {w for w in args.workloads.split(",") if w}
    args.w1_size = args.w1_size or (128 if args.tiny else 512)
    args.w2_size = args.w2_size or (128 if args.tiny else 1024)
    args.w2_prompts = args.w2_prompts or args.w_prompts
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    sys.path.insert(0, str(REPO))
    from comfy_parallel.settings import parse_devices
    workers = len(parse_devices(args.devices))
    specs = server_specs([n.strip() for n in args.servers.split(",") if n.strip()], args, workers)
    wfs.write_input_images(Path(args.comfyui) / "input", {archs[a].base for a in args.ident_archs})
    meta = {"devices": args.devices, "servers": [s.name for s in specs], "archs": args.ident_archs, "steps": args.steps,
            "w_steps": args.w_steps, "w_prompts": args.w_prompts, "w2_prompts": args.w2_prompts,
            "w1_size": args.w1_size, "w2_size": args.w2_size,
            "tiny": args.tiny, "kinds": list(args.kinds), "python": sys.version.split()[0], "host": platform.node(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": sys.argv[1:]}
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    results: list[dict] = []
    images: dict[str, dict] = {}
    global_deadline = t_start + args.budget_s
    reports: dict[str, dict] = {}
    for spec in specs:
        if global_deadline - time.monotonic() < 30:
            results.append({"server": spec.name, "cmd": spec.cmd, "skipped": "out of time", "errors": 0,
                            "phases": {}})
            print(f"[{spec.name}] skipped: out of time", flush=True)
            continue
        res, imgs = run_server(spec, args, archs, out, global_deadline)
        results.append(res)
        images[spec.name] = imgs
        res["digests"] = {ph: {k: [digest(i) for i in v] for k, v in d.items()} for ph, d in imgs.items()}
        meta["comfyui_version"] = meta.get("comfyui_version") or res.get("comfyui_version")
        reports = {ref: identity_report(results, images, ref) for ref in references(results, images)}
        (out / "gpu_check_033.json").write_text(json.dumps({"meta": meta, "results": results,
                                                            "identity": reports}, indent=1))
    ran = [r for r in results if "skipped" not in r]
    md = markdown(ran, reports, meta) if ran else "no server ran"
    skipped = [r["server"] for r in results if "skipped" in r]
    if skipped:
        md += f"\n\nNot run (out of time): {', '.join(skipped)}"
    (out / "gpu_check_033.md").write_text(md + "\n")
    print("\nTABLE\n" + md, flush=True)
    return 0 if all(r.get("errors") == 0 and "died" not in r and "failed" not in r and "skipped" not in r
                    for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
