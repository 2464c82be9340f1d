"""Soak under sustained mixed load (issue 14): the varied workflow set sent again and again by several clients.

One stock ComfyUI (``--disable-dynamic-vram``, GPU 0) first runs the set twice; its second (warm) round is the
reference image of every (kind, model, seed). Then, for each ``--configs`` entry, comfy-parallel is started with
that ``--devices`` and ``--clients`` threads keep submitting the set for ``--minutes``, each prompt made unique to
the executor cache by trailing spaces in its text (stock's own rounds show the spaces change no pixel). Every image
is compared with stock's. Per minute: img/s, errors, images identical to stock, RSS, GPU memory, and the CUDA graph
counts of ``/multigpu/status`` (captures, failures, graphs kept, evictions, replays, eager steps).

Goals (issue 14): 0 errors, every image identical to stock, RSS and GPU memory growth < 10% after the first minute,
the last minute's img/s >= 95% of the second's, and no recapture churn (captures after the first minute near 0).

usage (device machine, through bench/gpu_check_033.sh with SCRIPT=soak; see bench/results/soak_*.md):
    python3 bench/soak.py --comfyui /tmp/comfyui --configs '0*2,0,1' --minutes 3 --out $OUT
CPU smoke test (tiny sizes, one model, two CPU workers):
    python bench/soak.py --comfyui DIR --configs cpu,cpu --tiny --archs sd15 --steps 1 --minutes 0.5 --cpu
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import threading
import time
import urllib.error
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import workflows as wfs  # noqa: E402
from gpu_check import http, stop_all, sum_status_gib  # noqa: E402
from gpu_check_033 import (ServerDied, compare, execution_error, fetch_images, gpu_memory_used,  # noqa: E402
                           run_batch, server_specs)

from comfy_parallel.comfy_adapter.loader import has_cli_flag, read_version  # noqa: E402

SEEDS = (101, 201)
SAMPLE_S = 5.0


@dataclass
class Done:
    t: float               # seconds since the soak began
    key: str
    images: int
    error: str | None
    identical: bool | None  # None: no reference image
    max_diff: int | None


def cases(archs: list[str], seeds: int) -> list[tuple[str, str, int]]:
    return [(kind, arch, SEEDS[s] + i) for s in range(seeds) for arch in archs for i, kind in enumerate(wfs.KINDS)]


def case_key(case: tuple[str, str, int]) -> str:
    kind, arch, seed = case
    return f"{arch}/{kind}/{seed}"


def start(spec, args: argparse.Namespace, out: Path, log_name: str):  # type: ignore[no-untyped-def]
    import subprocess

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if spec.name.startswith("stock") and not args.cpu:
        env["CUDA_VISIBLE_DEVICES"] = "0"
    log = open(out / log_name, "w")
    proc = subprocess.Popen(spec.cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.monotonic() + args.start_timeout
    while True:
        if proc.poll() is not None:
            raise ServerDied(f"{spec.name} exited with {proc.returncode} at start (log {log_name})")
        if time.monotonic() > deadline:
            stop_all([proc])
            raise ServerDied(f"{spec.name} did not answer in {args.start_timeout:.0f}s")
        try:
            http(spec.port, "/system_stats", timeout=5)
            return proc
        except (OSError, ValueError):
            time.sleep(0.5)


def reference_name(comfyui: str) -> str:
    """Stock without DynamicVRAM where ComfyUI has it (0.33; comfy-parallel's loading mode), plain stock before
    (0.3.75 has no such flag and would refuse to start)."""
    return "stock-nodvram" if has_cli_flag(comfyui, "--disable-dynamic-vram") else "stock"


def reference(args: argparse.Namespace, archs: dict, all_cases: list, out: Path) -> dict[str, list]:
    """Stock's warm-round images of every case (round 1 warms up, round 2 is kept)."""
    spec = server_specs([reference_name(args.comfyui)], args, 1)[0]
    spec.cmd += args.comfy_args
    args.port += 1  # the next server gets a fresh port
    proc = start(spec, args, out, "stock.log")
    try:
        ref: dict[str, list] = {}
        for rnd in (1, 2):
            prompts = [(case_key(c), wfs.build(c[0], archs[c[1]], args.steps, c[2], f"soakref_r{rnd}", rnd))
                       for c in all_cases]
            outcomes, broken = run_batch(spec.port, proc, prompts, timeout=args.start_timeout * 2, stall_s=90)
            if broken:
                raise ServerDied(f"stock: {broken}")
            if rnd == 2:
                ref = {o.key: o.images for o in outcomes if o.status == "success"}
                bad = [f"{o.key}: {o.status} {o.error}" for o in outcomes if o.status != "success"]
                if bad:
                    print("stock reference errors:", *bad[:5], sep="\n  ", flush=True)
        return ref
    finally:
        stop_all([proc])


def soak(devices: str, args: argparse.Namespace, archs: dict, all_cases: list, ref: dict[str, list],
         out: Path) -> dict:
    name = f"parallel-{devices}"
    args.devices = devices
    spec = server_specs(["parallel"], args, 2)[0]
    spec.cmd += args.comfy_args
    args.port += 1
    print(f"\n[{name}] {' '.join(spec.cmd)}", flush=True)
    proc = start(spec, args, out, f"{name.replace('*', 'x').replace(',', '_')}.log")
    port = spec.port
    done: list[Done] = []
    samples: list[dict] = []
    counter = itertools.count()
    lock = threading.Lock()
    t0 = time.monotonic()
    stop_at = min(t0 + args.minutes * 60, args.deadline - 30)  # 30 s to drain, stop and write the results

    def client(index: int) -> None:
        while time.monotonic() < stop_at and proc.poll() is None:
            i = next(counter)
            case = all_cases[i % len(all_cases)]
            tag = 3 + (i // len(all_cases)) % 900
            key = case_key(case)
            wf = wfs.build(case[0], archs[case[1]], args.steps, case[2], f"soak{index}", tag)
            try:
                pid = http(port, "/prompt", {"prompt": wf, "client_id": f"soak-{index}"})["prompt_id"]
                entry = None
                while entry is None and proc.poll() is None:
                    time.sleep(0.1)
                    entry = http(port, f"/history/{pid}", timeout=30).get(pid)
                    status = (entry or {}).get("status") or {}
                    if entry is not None and not (status.get("completed") or status.get("status_str") == "error"):
                        entry = None
                if entry is None:
                    rec = Done(time.monotonic() - t0, key, 0, "server exited", None, None)
                elif status.get("status_str") != "success":
                    err = execution_error(entry) or {"message": json.dumps(status)[:500]}
                    rec = Done(time.monotonic() - t0, key, 0, f"{err.get('exception_type')}: {err.get('message')}",
                               None, None)
                else:
                    t_done = time.monotonic() - t0
                    images = fetch_images(port, entry)
                    cmp = compare(ref[key], images) if key in ref else None
                    rec = Done(t_done, key, len(images), None, None if cmp is None else cmp["identical"],
                               None if cmp is None else cmp.get("max_diff"))
            except (OSError, urllib.error.URLError, KeyError, ValueError) as err:
                rec = Done(time.monotonic() - t0, key, 0, f"client: {type(err).__name__}: {err}", None, None)
            with lock:
                done.append(rec)

    def sampler(stop: threading.Event) -> None:
        while not stop.is_set():
            row = {"t": round(time.monotonic() - t0, 1), "rss_gib": sum_status_gib([proc.pid], "VmRSS"),
                   "gpu_mib": gpu_memory_used()}
            try:
                row["graphs"] = {k: v for k, v in http(port, "/multigpu/status", timeout=10)["cuda_graphs"].items()
                                 if k != "per_worker"}
            except (OSError, KeyError, ValueError):
                row["graphs"] = None
            samples.append(row)
            stop.wait(SAMPLE_S)

    stop = threading.Event()
    sample_thread = threading.Thread(target=sampler, args=(stop,), daemon=True)
    sample_thread.start()
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(args.minutes * 60 + 240)
    stop.set()
    sample_thread.join(30)
    final_status = {}
    try:
        final_status = http(port, "/multigpu/status", timeout=10)
    except OSError:
        pass
    alive = proc.poll() is None
    stop_all([proc])
    return {"name": name, "devices": devices, "alive_at_end": alive, "minutes": per_minute(done, samples, args),
            "done": [d.__dict__ for d in done], "samples": samples,
            "cuda_graphs_end": final_status.get("cuda_graphs"), "diffs": diff_summary(done)}


def at(samples: list[dict], t: float) -> dict | None:
    """The last sample taken at or before ``t`` seconds."""
    before = [s for s in samples if s["t"] <= t]
    return before[-1] if before else None


def per_minute(done: list[Done], samples: list[dict], args: argparse.Namespace) -> list[dict]:
    rows = []
    last = max((d.t for d in done), default=0.0)
    minutes = max(1, min(int(round(args.minutes)), int(last // 60) + 1))
    for m in range(minutes):
        lo, hi = m * 60.0, (m + 1) * 60.0
        window = [d for d in done if lo <= d.t < hi]
        start_s, end_s = at(samples, lo + SAMPLE_S / 2), at(samples, hi)
        graphs_a = (start_s or {}).get("graphs") or {}
        graphs_b = (end_s or {}).get("graphs") or {}
        compared = [d for d in window if d.identical is not None]
        rows.append({
            "minute": m + 1, "partial": last < hi, "prompts": len(window),
            "img_per_s": round(sum(d.images for d in window) / 60.0, 3),
            "errors": sum(d.error is not None for d in window),
            "identical": f"{sum(bool(d.identical) for d in compared)}/{len(compared)}",
            "rss_gib": (end_s or {}).get("rss_gib"), "gpu_mib": (end_s or {}).get("gpu_mib"),
            "captures": graphs_b.get("captures", 0) - (graphs_a.get("captures", 0) if m else 0),
            "failures": graphs_b.get("failures", 0) - (graphs_a.get("failures", 0) if m else 0),
            "graphs_kept": graphs_b.get("graphs"), "evictions": graphs_b.get("evictions"),
            "replays": graphs_b.get("replays"), "eager": graphs_b.get("eager"),
        })
    return rows


def diff_summary(done: list[Done]) -> dict[str, str]:
    out: dict[str, set] = {}
    for d in done:
        if d.identical is False:
            out.setdefault(d.key, set()).add(d.max_diff)
    return {k: ",".join(f"d{v}" for v in sorted(x for x in vals if x is not None)) for k, vals in sorted(out.items())}


def goals(res: dict) -> dict[str, bool | None]:
    rows = [r for r in res["minutes"] if not r.get("partial")] or res["minutes"]
    total_err = sum(r["errors"] for r in res["minutes"])
    # warm images: a worker's first image of a kind after its start may differ, as stock's own may (issue 14)
    compared = [tuple(map(int, r["identical"].split("/"))) for r in res["minutes"][1:]]
    same = None if not sum(b for _, b in compared) else sum(a for a, _ in compared) == sum(b for _, b in compared)

    def growth(field: str) -> float | None:
        first, last = rows[0].get(field), rows[-1].get(field)
        if isinstance(first, list):
            first, last = sum(first), sum(last or [])
        return None if not first or last is None else last / first - 1

    rss, gpu = growth("rss_gib"), growth("gpu_mib")
    speed = rows[-1]["img_per_s"] / rows[1]["img_per_s"] if len(rows) >= 3 and rows[1]["img_per_s"] else None
    return {"0 errors": total_err == 0 and res["alive_at_end"], "images identical to stock (minute 2 on)": same,
            "RSS growth < 10%": None if rss is None else rss < 0.10,
            "GPU memory growth < 10%": None if gpu is None else gpu < 0.10,
            "last minute img/s >= 95% of the second's": None if speed is None else speed >= 0.95}


def markdown(results: list[dict], meta: dict) -> str:
    lines = [f"Soak: ComfyUI {meta['comfyui']}, {meta['cases']} prompts in the set "
             f"({', '.join(meta['archs'])}; {meta['steps']} steps), {meta['clients']} clients, "
             f"{meta['minutes']} min per configuration; images compared with "
             f"{meta.get('reference', 'stock-nodvram')} (warm round)", ""]
    for res in results:
        lines += [f"### `--devices {res['devices']}`" + ("" if res["alive_at_end"] else " (SERVER DIED)"), "",
                  "| minute | prompts | img/s | errors | identical to stock | RSS GiB | GPU MiB | captures | "
                  "capture failures | graphs kept | evictions | replays / eager steps (total) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in res["minutes"]:
            minute = f"{r['minute']}{' (partial)' if r.get('partial') else ''}"
            lines.append(f"| {minute} | {r['prompts']} | {r['img_per_s']} | {r['errors']} | {r['identical']} | "
                         f"{r['rss_gib']} | {r['gpu_mib']} | {r['captures']} | {r['failures']} | "
                         f"{r['graphs_kept']} | {r['evictions']} | {r['replays']} / {r['eager']} |")
        lines += ["", "Goals: " + ", ".join(f"{k}: {'met' if v else 'not met' if v is False else 'n/a'}"
                                            for k, v in res["goals"].items())]
        if res["diffs"]:
            lines.append("Differing images (key: max pixel differences seen): " +
                         "; ".join(f"{k} {v}" for k, v in res["diffs"].items()))
        errors = [d for d in res["done"] if d["error"]]
        if errors:
            lines.append(f"First error: {errors[0]['key']}: {errors[0]['error'][:400]}")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--comfyui", default="/tmp/comfyui")
    ap.add_argument("--frontend", default=str(Path(__file__).resolve().parent.parent / ".device" / "frontend"))
    ap.add_argument("--configs", default="0*2", help="comfy-parallel --devices per soak, ';'-separated when a "
                                                     "value holds commas (e.g. '0*2;0,1')")
    ap.add_argument("--archs", default="sd15,sdxl")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--seeds", type=int, default=2, choices=(1, 2))
    ap.add_argument("--minutes", type=float, default=3.0)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--port", type=int, default=8488)
    ap.add_argument("--start-timeout", type=float, default=180)
    ap.add_argument("--comfy-arg", dest="comfy_args", action="append", default=[],
                    help="a ComfyUI argument for stock and comfy-parallel alike, e.g. --comfy-arg=--cache-classic "
                         "(0.33's RAM-pressure cache keeps every new prompt's outputs; issue 14's RSS question)")
    ap.add_argument("--budget-s", type=float, default=3600, help="seconds the whole run may take (a soak that "
                                                                  "would pass it is cut short)")
    ap.add_argument("--out", default=os.environ.get("OUT") or "bench/results/soak_local")
    args = ap.parse_args()
    args.deadline = time.monotonic() + args.budget_s
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = wfs.TINY if args.tiny else wfs.ARCHS
    arch_names = [a for a in args.archs.split(",") if a]
    archs = {a: table[a] for a in arch_names}
    wfs.write_input_images(Path(args.comfyui) / "input", {a.base for a in archs.values()})
    all_cases = cases(arch_names, args.seeds)
    meta = {"comfyui": read_version(args.comfyui),
            "archs": arch_names, "steps": args.steps, "clients": args.clients, "minutes": args.minutes,
            "cases": len(all_cases), "host": platform.node(), "command": " ".join(sys.argv),
            "reference": reference_name(args.comfyui)}
    print(f"reference: stock, {len(all_cases)} prompts x 2 rounds", flush=True)
    ref = reference(args, archs, all_cases, out)
    print(f"reference: {len(ref)} images sets", flush=True)
    results = []
    for devices in args.configs.split(";"):
        res = soak(devices, args, archs, all_cases, ref, out)
        res["goals"] = goals(res)
        results.append(res)
        print(markdown([res], meta), flush=True)
        (out / "soak.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1, default=str))
    (out / "soak.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1, default=str))
    (out / "soak.md").write_text(markdown(results, meta))
    print("\nTABLE\n" + markdown(results, meta), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
