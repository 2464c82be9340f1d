"""First request vs steady state, with and without --warmup-checkpoint (real servers, driven over HTTP).

usage: python bench/warmup_latency.py [--comfyui-version 0.3.75] [--devices cpu,cpu] [--n 10] [--size 64]
                                      [--steps 2] [--out bench/results/warmup_latency_cpu.md]

Builds (or reuses) the random-weight SD1.5-shaped checkpoint the tests use, then for each mode starts
``comfy-parallel serve``, waits for /ready, sends ``n`` prompts one after another to device 0 and reports the
latency (submit -> history) of the first, the median of the rest, and the first minus the tenth.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from harness import Server  # noqa: E402
from test_diffusion import txt2img  # noqa: E402

from comfy_parallel.ops import provision  # noqa: E402


def build_checkpoint() -> Path:
    import subprocess

    models = provision.home() / "models"
    ckpt = models / "sd15-rand.safetensors"
    if not ckpt.exists():
        tmp = models / "sd15-rand.partial.safetensors"
        subprocess.run([sys.executable, str(REPO / "tools" / "make_rand_ckpt.py"),
                        str(provision.ensure_comfyui()), "sd15", str(tmp)], check=True)
        tmp.rename(ckpt)
    return models


def run_mode(comfy_dir: Path, models: Path, devices: str, warmup: bool, n: int, size: int, steps: int) -> dict:
    serve_args = ["--warmup-checkpoint", "sd15-rand.safetensors"] if warmup else []
    t0 = time.time()
    server = Server(comfy_dir, mode="multi", devices=devices, entry_ports=False, models_dir=models,
                    serve_args=serve_args, name=f"bench-warmup-{int(warmup)}").start(timeout=300)
    try:
        while server.get("/ready").status != 200:
            time.sleep(0.2)
        ready_s = time.time() - t0
        latencies = []
        for i in range(n):
            start = time.time()
            pid = server.submit(txt2img(seed=i, size=size, steps=steps), headers={"X-TARGET-GPU": "0"})["prompt_id"]
            entry = server.wait_history(pid, timeout=600)
            assert entry["status"]["status_str"] == "success", entry["status"]
            latencies.append(time.time() - start)
        return {"warmup": warmup, "ready_s": ready_s, "latencies": latencies}
    finally:
        server.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--comfyui-version", default=provision.DEFAULT_VERSION)
    ap.add_argument("--devices", default="cpu,cpu")
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "warmup_latency_cpu.md"))
    args = ap.parse_args()
    comfy_dir = provision.ensure_comfyui(args.comfyui_version)
    models = build_checkpoint()
    rows = [run_mode(comfy_dir, models, args.devices, w, args.n, args.size, args.steps) for w in (False, True)]
    lines = [
        "# First request vs steady state (warm-up)",
        "",
        f"Command: `python bench/warmup_latency.py --devices {args.devices} --n {args.n} --size {args.size} "
        f"--steps {args.steps}`  ",
        f"Machine: {platform.node()}, {platform.processor() or platform.machine()}, Python "
        f"{platform.python_version()}; ComfyUI {args.comfyui_version}; SD1.5-shaped random checkpoint, "
        f"{args.size}x{args.size}, {args.steps} steps; prompts sent one after another to device 0.",
        "",
        "| mode | start to /ready s | first s | median of 2..n s | tenth s | first - tenth s |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lat = r["latencies"]
        tenth = lat[min(9, len(lat) - 1)]
        lines.append(f"| {'--warmup-checkpoint' if r['warmup'] else 'no model warm-up'} | {r['ready_s']:.1f} | "
                     f"{lat[0]:.2f} | {statistics.median(lat[1:]):.2f} | {tenth:.2f} | {lat[0] - tenth:.2f} |")
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
