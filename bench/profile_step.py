"""Where does the host time of one sampling step go?  Stock ComfyUI 0.3.75 code used as a library.

Runs ON the device machine (bench/profile_step.sh sets it up); also runs on CPU with --cpu for a smoke test.

For each workload (W1 = SD1.5-shaped 512x512 -> latent 64x64, W2 = SDXL-shaped 1024x1024 -> latent 128x128, cfg 7,
so the UNet sees cond+uncond as one batch of 2 exactly as KSampler runs it) this measures
  * the bare diffusion-model forward, called with the very arguments KSampler passes (captured from a real 1-step
    sampler run): per step wall ms (synchronize after), host ms (until the Python call returns, no sync inside our
    code), GPU ms (CUDA events around the step), pipelined ms/step (steps back to back, one sync at the end);
    under torch.inference_mode (what the ComfyUI server wraps prompts in) and under no_grad (what the k-diffusion
    samplers use on their own), and at batch 1;
  * the same forward replayed from a CUDA graph (capture per shape), to price the "graph capture" lever;
  * torch.profiler (CPU+CUDA, with_stack=False) over a few steps: self CPU time per category (Python between ops,
    aten dispatch, CUDA runtime launch / sync / other), kernels per step, GPU kernel time per step, syncs per step;
  * host-device syncs located by torch.cuda.set_sync_debug_mode (file:line of each synchronizing call);
  * the real sampler path (nodes.common_ksampler, euler/normal, cfg 7): ms/step from the slope between a 20-step and
    a 2-step run, and the sampler's own per-step overhead against the bare forward;
  * py-spy (if a binary is given) attached to a child process that loops steps: top functions by own time.
Order matters: every timing is taken first (phase 1), torch.profiler runs after it (phase 2), and phase 3 re-times the
bare forward and the sampler, because a profiler session leaves CUPTI attached and slows what follows in the process
(pytorch/pytorch#144455).
Prints a compact table; writes profile_step.json, key_averages.txt (top 40 by self CPU per profile) and the raw
py-spy outputs into --out.

usage: python profile_step.py --comfyui DIR --ckpt-w1 SD15.safetensors [--ckpt-w2 SDXL.safetensors] --out DIR
       [--cpu] [--w1-size 512] [--w2-size 1024] [--pyspy /path/to/py-spy]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from collections import Counter

P = argparse.ArgumentParser()
P.add_argument("--comfyui", required=True)
P.add_argument("--ckpt-w1")
P.add_argument("--ckpt-w2")
P.add_argument("--out", default="/tmp/profile_step_out")
P.add_argument("--cpu", action="store_true", help="ComfyUI --cpu (smoke test without a GPU)")
P.add_argument("--w1-size", type=int, default=512)
P.add_argument("--w2-size", type=int, default=1024)
P.add_argument("--timed", type=int, default=30, help="timed bare steps per variant")
P.add_argument("--warmup", type=int, default=5)
P.add_argument("--prof-steps", type=int, default=4, help="bare steps under torch.profiler")
P.add_argument("--sampler-steps", type=int, default=20)
P.add_argument("--sampler-short", type=int, default=2, help="short sampler run; per-step cost = slope")
P.add_argument("--sampler-reps", type=int, default=3)
P.add_argument("--prof-sampler", default="3,6", help="sampler steps of the two profiled sampler runs")
P.add_argument("--cfg", type=float, default=7.0)
P.add_argument("--pyspy", default="", help="py-spy binary; empty = skip")
P.add_argument("--pyspy-targets", default="W2:sampler,W2:bare,W1:sampler")
P.add_argument("--pyspy-rate", type=int, default=500)
P.add_argument("--pyspy-seconds", type=int, default=8)
P.add_argument("--no-graph", action="store_true")
P.add_argument("--child", choices=["bare", "sampler"], help=argparse.SUPPRESS)
P.add_argument("--child-ckpt", help=argparse.SUPPRESS)
P.add_argument("--child-size", type=int, help=argparse.SUPPRESS)
P.add_argument("--child-seconds", type=float, default=30, help=argparse.SUPPRESS)
A = P.parse_args()
SCRIPT = os.path.abspath(__file__)
OUT = os.path.abspath(A.out)
os.makedirs(OUT, exist_ok=True)

# ---- ComfyUI as a library (as /work/shared/baseline/thread_scaling.py does) ----
os.chdir(A.comfyui)
sys.path.insert(0, A.comfyui)
sys.argv = [sys.argv[0]] + (["--cpu"] if A.cpu else [])
import comfy.options  # noqa: E402
comfy.options.enable_args_parsing()
import torch  # noqa: E402
import nodes  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.model_management as mm  # noqa: E402
from torch.profiler import profile, ProfilerActivity, record_function  # noqa: E402

CUDA = torch.cuda.is_available() and not A.cpu
DEV = mm.get_torch_device()


def sync():
    if CUDA:
        torch.cuda.synchronize()


def log(*a):
    print(*a, flush=True)


def med(xs):
    return round(statistics.median(xs), 3) if xs else None


def load(ckpt, size):
    t0 = time.perf_counter()
    model, clip, vae = comfy.sd.load_checkpoint_guess_config(ckpt, output_vae=True, output_clip=True)[:3]
    pos = nodes.CLIPTextEncode().encode(clip, "a photo of a cat")[0]
    neg = nodes.CLIPTextEncode().encode(clip, "blurry")[0]
    lat = nodes.EmptyLatentImage().generate(size, size, 1)[0]
    return dict(model=model, pos=pos, neg=neg, lat=lat, load_s=time.perf_counter() - t0)


def ksample(ctx, steps, seed=0):
    out = nodes.common_ksampler(ctx["model"], seed, steps, A.cfg, "euler", "normal", ctx["pos"], ctx["neg"], ctx["lat"])
    return out[0]["samples"]


def capture_forward_args(ctx):
    """Run a 1-step sampler with the diffusion model's forward wrapped; keep the first call's arguments."""
    dm = ctx["model"].model.diffusion_model
    seen = []
    orig = dm.forward

    def spy(*a, **k):
        if not seen:
            seen.append((a, k))
        return orig(*a, **k)

    dm.forward = spy
    try:
        with torch.inference_mode():
            ksample(ctx, 1)
    finally:
        del dm.forward  # back to the class's forward
    a, k = seen[0]
    return dm, a, k


def describe(a, k):
    def d(v):
        if torch.is_tensor(v):
            return f"{tuple(v.shape)} {str(v.dtype).replace('torch.', '')} {v.device}"
        if isinstance(v, dict):
            return "{" + ", ".join(sorted(map(str, v.keys()))) + "}"
        return type(v).__name__
    return {"args": [d(v) for v in a], "kwargs": {key: d(v) for key, v in k.items()}}


def slice_b1(v):
    if torch.is_tensor(v) and v.ndim >= 1 and v.shape[0] == 2:
        return v[:1].clone()
    return v


# ---------------------------------------------------------------- timing
def time_steps(fn, n, warm=None):
    for _ in range(A.warmup if warm is None else warm):
        fn()
    sync()
    host, wall, gpu = [], [], []
    for _ in range(n):
        sync()
        if CUDA:
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        if CUDA:
            e1.record()
        sync()
        t2 = time.perf_counter()
        host.append((t1 - t0) * 1e3)
        wall.append((t2 - t0) * 1e3)
        if CUDA:
            gpu.append(e0.elapsed_time(e1))
    sync()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    sync()
    t2 = time.perf_counter()
    return {"n": n, "wall_ms": med(wall), "host_ms": med(host), "gpu_event_ms": med(gpu),
            "host_ms_min": round(min(host), 3), "wall_ms_min": round(min(wall), 3),
            "pipelined_ms": round((t2 - t0) * 1e3 / n, 3), "pipelined_enqueue_ms": round((t1 - t0) * 1e3 / n, 3)}


def graph_replay(dm, a, k, ref):
    """Capture the forward in a CUDA graph (static inputs = the captured ones) and time replays."""
    res = {}
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.inference_mode():
            with torch.cuda.stream(s):
                for _ in range(3):
                    dm(*a, **k)
            torch.cuda.current_stream().wait_stream(s)
            sync()
            g = torch.cuda.CUDAGraph()
            t0 = time.perf_counter()
            with torch.cuda.graph(g):
                out = dm(*a, **k)
            sync()
            res["capture_s"] = round(time.perf_counter() - t0, 3)
            g.replay()
            sync()
            res["max_abs_diff_vs_eager"] = float((out.float() - ref.float()).abs().max())
            res.update(time_steps(g.replay, A.timed))
        del g, out
    except Exception as e:  # noqa: BLE001
        res["error"] = f"{type(e).__name__}: {str(e)[:400]}"
    torch.cuda.empty_cache()
    return res


# ---------------------------------------------------------------- profiler analysis
def is_cuda_dev(e):
    return str(e.device_type).endswith("CUDA")


def classify_cpu(name, marks):
    if name in marks:
        return "python_between_ops"
    if name.startswith("aten::"):
        return "aten_dispatch_self"
    if "LaunchKernel" in name or name in ("cudaGraphLaunch", "cuGraphLaunch"):
        return "cuda_launch"
    if "Synchronize" in name:
        return "cuda_sync_calls"
    if name.startswith(("cudaMemcpy", "cudaMemset", "cuMemcpy", "cuMemset")):
        return "cuda_memcpy_memset"
    if name.startswith("cuda") or (name.startswith("cu") and name[2:3].isupper()):
        return "cuda_runtime_other"
    return "other_ops"


def analyze(prof, marks, nsteps, my_syncs_per_step=0):
    """Per-step averages from one profile. `marks` = names of our record_function ranges (one per step or run)."""
    evs = [e for e in prof.events() if e.name != "[memory]"]
    cpu = [e for e in evs if not is_cuda_dev(e)]
    dev = [e for e in evs if is_cuda_dev(e) and e.name not in marks]
    tops = [e for e in cpu if e.name in marks]
    span_us = sum(e.time_range.elapsed_us() for e in tops)
    cat = Counter()
    cnt = Counter()
    ours = 0.0
    for e in cpu:
        c = classify_cpu(e.name, marks)
        if e.name == "cudaDeviceSynchronize" and (e.cpu_parent is None or e.cpu_parent.name in marks):
            c = "wait_for_gpu_our_sync"  # torch.cuda.synchronize() at the end of each step (ours, not ComfyUI's)
            ours += e.self_cpu_time_total
        cat[c] += e.self_cpu_time_total
        cnt[e.name] += 1
    launches = {n: c for n, c in cnt.items() if "LaunchKernel" in n or "GraphLaunch" in n}
    launch_us = sum(e.self_cpu_time_total for e in cpu if e.name in launches)
    kernels = [e for e in dev if not e.name.startswith(("Memcpy", "Memset"))]
    memcpy = Counter(e.name for e in dev if e.name.startswith("Memcpy"))
    aten_all = sum(c for n, c in cnt.items() if n.startswith("aten::"))
    # top-level aten ops = direct children of our marks
    top_ops = [e for e in cpu
               if e.cpu_parent is not None and e.cpu_parent.name in marks and e.name.startswith("aten::")]
    sync_calls = {n: c for n, c in cnt.items() if "Synchronize" in n}
    if my_syncs_per_step and "cudaDeviceSynchronize" in sync_calls:
        sync_calls["cudaDeviceSynchronize"] -= my_syncs_per_step * nsteps
    r = {
        "steps": nsteps,
        "profiled_cpu_ms_per_step": span_us / nsteps / 1e3,
        "profiled_host_ms_per_step": (span_us - ours) / nsteps / 1e3,
        "self_cpu_ms_per_step": {k: round(v / nsteps / 1e3, 3) for k, v in cat.most_common()},
        "aten_ops_per_step": aten_all / nsteps,
        "top_level_aten_ops_per_step": len(top_ops) / nsteps,
        "launch_calls_per_step": {n: c / nsteps for n, c in launches.items()},
        "launch_cpu_ms_per_step": launch_us / nsteps / 1e3,
        "gpu_kernels_per_step": len(kernels) / nsteps,
        "gpu_kernel_ms_per_step": sum(e.time_range.elapsed_us() for e in kernels) / nsteps / 1e3,
        "memcpy_per_step": {n: c / nsteps for n, c in memcpy.items()},
        "sync_calls_per_step": {n: c / nsteps for n, c in sync_calls.items() if c},
        "local_scalar_dense_per_step": cnt.get("aten::_local_scalar_dense", 0) / nsteps,
        "item_per_step": cnt.get("aten::item", 0) / nsteps,
        "top_cpu_op_names_per_step": {n: round(c / nsteps, 2) for n, c in cnt.most_common(25)},
    }
    return r


def profile_bare(fn, n, label, tables):
    for _ in range(2):
        fn()
    sync()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if CUDA else [])
    with profile(activities=acts, record_shapes=False, with_stack=False) as prof:
        for _ in range(n):
            with record_function("STEP"):
                fn()
                sync()
    tables.append(f"==== {label}: bare forward, {n} steps, top 40 by self CPU (totals over the {n} steps)\n"
                  + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=60))
    return analyze(prof, {"STEP"}, n, my_syncs_per_step=1 if CUDA else 0)


def profile_sampler(ctx, steps, label, tables):
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if CUDA else [])
    sync()
    with profile(activities=acts, record_shapes=False, with_stack=False) as prof:
        with record_function("SAMPLER"):
            with torch.inference_mode():
                ksample(ctx, steps)
            sync()
    tables.append(f"==== {label}: common_ksampler {steps} steps, top 40 by self CPU\n"
                  + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=60))
    return analyze(prof, {"SAMPLER"}, 1, my_syncs_per_step=1 if CUDA else 0)


def diff_profiles(a, b, dsteps):
    """Per-step values from two sampler profiles (b has dsteps more steps than a)."""
    out = {}
    for key in ("profiled_cpu_ms_per_step", "profiled_host_ms_per_step", "aten_ops_per_step",
                "top_level_aten_ops_per_step", "launch_cpu_ms_per_step", "gpu_kernels_per_step",
                "gpu_kernel_ms_per_step", "local_scalar_dense_per_step", "item_per_step"):
        out[key] = round((b[key] - a[key]) / dsteps, 3)
    for key in ("self_cpu_ms_per_step", "launch_calls_per_step", "memcpy_per_step", "sync_calls_per_step"):
        ks = set(a[key]) | set(b[key])
        out[key] = {k: round((b[key].get(k, 0) - a[key].get(k, 0)) / dsteps, 3) for k in ks}
    out["fixed_cpu_ms_per_run"] = round(a["profiled_cpu_ms_per_step"] - out["profiled_cpu_ms_per_step"] * A_STEPS[0], 3)
    return out


def sync_sites(fn):
    """file:line of every call that synchronizes host and device (torch.cuda.set_sync_debug_mode)."""
    if not CUDA:
        return {}
    sites = Counter()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    for x in w:
        msg = str(x.message).split("\n")[0][:80]
        where = os.path.relpath(x.filename, A.comfyui) if x.filename.startswith(A.comfyui) else x.filename
        sites[f"{where}:{x.lineno} {msg}"] += 1
    return dict(sites.most_common(30))


# ---------------------------------------------------------------- py-spy
def parse_pyspy(path, top=15):
    own, incl = Counter(), Counter()
    total = 0
    with open(path) as f:
        for line in f:
            line = line.rstrip("\n")
            if not line or " " not in line:
                continue
            stack, _, c = line.rpartition(" ")
            try:
                c = int(c)
            except ValueError:
                continue
            frames = [fr for fr in stack.split(";") if fr]
            if not frames:
                continue
            total += c

            def fn(fr):  # "func (file.py:123)" -> "func (file.py)"
                if fr.endswith(")") and "(" in fr:
                    head, _, loc = fr[:-1].rpartition("(")
                    loc = loc.rsplit(":", 1)[0]
                    for pfx in (A.comfyui + "/", "/tmp/site/", "/opt/torch/.venv/lib/python3.12/site-packages/"):
                        loc = loc.replace(pfx, "")
                    return f"{head.strip()} ({loc})"
                return fr
            own[fn(frames[-1])] += c
            for name in set(fn(fr) for fr in frames):
                incl[name] += c
    pct = lambda c: round(100.0 * c / total, 1) if total else 0.0  # noqa: E731
    return {"samples": total,
            "top_own": [(n, c, pct(c)) for n, c in own.most_common(top)],
            "top_inclusive": [(n, c, pct(c)) for n, c in incl.most_common(30)]}


def run_pyspy(target, ckpts, sizes):
    wl, mode = target.split(":")
    if wl not in ckpts:
        return {"skipped": f"no checkpoint for {wl}"}
    outfile = os.path.join(OUT, f"pyspy_{wl}_{mode}.txt")
    cmd = [sys.executable, SCRIPT, "--comfyui", A.comfyui, "--out", OUT, "--child", mode, "--child-ckpt", ckpts[wl],
           "--child-size", str(sizes[wl]), "--child-seconds", str(A.pyspy_seconds + 4)] + (["--cpu"] if A.cpu else [])
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    res = {"cmd": f"py-spy record --pid PID -r {A.pyspy_rate} -d {A.pyspy_seconds} -f raw "
                  f"-o {os.path.basename(outfile)}"}
    try:
        t0 = time.time()
        ready = None
        for line in child.stdout:
            if line.startswith("READY"):
                ready = line.split()
                break
            if time.time() - t0 > 120:
                break
        if not ready:
            res["error"] = "child never got READY"
            return res
        res["child_ready_after_s"] = round(time.time() - t0, 1)
        p = subprocess.run([A.pyspy, "record", "--pid", str(child.pid), "-r", str(A.pyspy_rate), "-d",
                            str(A.pyspy_seconds), "-f", "raw", "-o", outfile],
                           capture_output=True, text=True, timeout=A.pyspy_seconds + 60)
        res["pyspy_rc"] = p.returncode
        res["pyspy_stderr_tail"] = (p.stdout + p.stderr)[-600:]
        if os.path.exists(outfile):
            res.update(parse_pyspy(outfile))
    except Exception as e:  # noqa: BLE001
        res["error"] = f"{type(e).__name__}: {e}"
    finally:
        try:
            rest = child.communicate(timeout=90)[0]  # the child stops by itself pyspy_seconds + 4 s after READY
        except subprocess.TimeoutExpired:
            child.kill()
            rest = child.communicate(timeout=30)[0]
        res["child_steps_line"] = [ln for ln in (rest or "").splitlines() if ln.startswith("CHILD")][-1:]
    return res


def child_main():
    ctx = load(A.child_ckpt, A.child_size)
    dm, a, k = capture_forward_args(ctx)
    if A.child == "bare":
        def once():
            with torch.inference_mode():
                dm(*a, **k)
            sync()
    else:
        def once():
            with torch.inference_mode():
                ksample(ctx, A.sampler_steps)
            sync()
    once(); once()
    print(f"READY {os.getpid()}", flush=True)
    t0 = time.time()
    n = 0
    while time.time() - t0 < A.child_seconds:
        once()
        n += 1
    dt = time.time() - t0
    per = A.sampler_steps if A.child == "sampler" else 1
    print(f"CHILD {A.child} {n} iterations in {dt:.1f}s = {dt * 1e3 / max(n, 1):.1f} ms/iteration = "
          f"{dt * 1e3 / max(n * per, 1):.1f} ms/step (under py-spy sampling)", flush=True)


# ---------------------------------------------------------------- main
A_STEPS = [int(x) for x in A.prof_sampler.split(",")]


def setup(label, ckpt, size):
    r = {"label": label, "ckpt": os.path.basename(ckpt), "image": f"{size}x{size}",
         "latent": f"{size // 8}x{size // 8}"}
    log(f"\n=== {label}: {r['ckpt']} {r['image']}")
    ctx = load(ckpt, size)
    r["load_s"] = round(ctx["load_s"], 2)
    with torch.inference_mode():
        ksample(ctx, 2)  # warm-up: loads the model onto the device
    sync()
    dm, a, k = capture_forward_args(ctx)
    r["forward_args"] = describe(a, k)
    r["unet_dtype"] = str(next(dm.parameters()).dtype)
    r["n_params"] = sum(p.numel() for p in dm.parameters())
    r["n_modules"] = sum(1 for _ in dm.modules())
    log(f"  forward args: {r['forward_args']}")
    st = dict(r=r, ctx=ctx, dm=dm, a=a, k=k)
    a1 = tuple(slice_b1(v) for v in a)
    k1 = {key: slice_b1(v) for key, v in k.items()}

    def fwd_inf():
        with torch.inference_mode():
            return dm(*a, **k)

    def fwd_nograd():
        with torch.no_grad():
            return dm(*a, **k)

    def fwd_b1():
        with torch.inference_mode():
            return dm(*a1, **k1)
    st.update(fwd_inf=fwd_inf, fwd_nograd=fwd_nograd, fwd_b1=fwd_b1)
    return st


def ensure_loaded(st):
    mm.load_models_gpu([st["ctx"]["model"]])
    sync()


def time_sampler(ctx, steps, reps, inference=True):
    ts = []
    for rep in range(reps):
        sync()
        t0 = time.perf_counter()
        if inference:
            with torch.inference_mode():
                ksample(ctx, steps, seed=rep)
        else:
            ksample(ctx, steps, seed=rep)
        sync()
        ts.append((time.perf_counter() - t0) * 1e3)
    return ts


def phase_clean(st):
    """Everything timed, before any torch.profiler session in this process (CUPTI stays attached after one)."""
    r, ctx = st["r"], st["ctx"]
    ensure_loaded(st)
    bare = {}
    bare["inference_mode_b2"] = time_steps(st["fwd_inf"], A.timed)
    log(f"  bare fwd (inference_mode, batch 2): {bare['inference_mode_b2']}")
    bare["no_grad_b2"] = time_steps(st["fwd_nograd"], max(10, A.timed // 2))
    log(f"  bare fwd (no_grad, batch 2): {bare['no_grad_b2']}")
    bare["inference_mode_b1"] = time_steps(st["fwd_b1"], max(10, A.timed // 2))
    log(f"  bare fwd (inference_mode, batch 1): {bare['inference_mode_b1']}")
    r["bare"] = bare

    smp = {}
    smp[f"long_{A.sampler_steps}_steps_ms"] = [round(x, 1) for x in time_sampler(ctx, A.sampler_steps, A.sampler_reps)]
    smp[f"short_{A.sampler_short}_steps_ms"] = [round(x, 1) for x in time_sampler(ctx, A.sampler_short, A.sampler_reps)]
    tl = statistics.median(smp[f"long_{A.sampler_steps}_steps_ms"])
    tsh = statistics.median(smp[f"short_{A.sampler_short}_steps_ms"])
    slope = (tl - tsh) / (A.sampler_steps - A.sampler_short)
    smp["ms_per_step_slope"] = round(slope, 3)
    smp["fixed_ms_per_run"] = round(tsh - slope * A.sampler_short, 3)
    smp["ms_per_step_incl_fixed"] = round(tl / A.sampler_steps, 3)
    # without inference_mode: how /work/shared/baseline/thread_scaling.py called it (k-diffusion's no_grad only)
    smp[f"no_inference_mode_{A.sampler_steps}_steps_ms"] = [
        round(x, 1) for x in time_sampler(ctx, A.sampler_steps, max(1, A.sampler_reps - 1), inference=False)]
    smp["overhead_vs_bare_pipelined_ms_per_step"] = round(slope - bare["inference_mode_b2"]["pipelined_ms"], 3)
    r["sampler"] = smp
    log(f"  sampler: {smp}")

    # CUDA graph of the same forward; after the eager timings so that a failed capture cannot spoil them
    if CUDA and not A.no_graph:
        ref = st["fwd_inf"]()
        sync()
        r["cuda_graph_b2"] = graph_replay(st["dm"], st["a"], st["k"], ref)
        del ref
        log(f"  cuda graph replay (batch 2): {r['cuda_graph_b2']}")

    calls = Counter()
    h = torch.nn.modules.module.register_module_forward_pre_hook(lambda m, i: calls.update([type(m).__name__]))
    try:
        st["fwd_inf"]()
    finally:
        h.remove()
    sync()
    r["module_calls_per_step"] = sum(calls.values())
    r["module_calls_by_class"] = dict(calls.most_common(15))
    log(f"  nn.Module calls per forward: {r['module_calls_per_step']} {r['module_calls_by_class']}")

    def sampler3():
        with torch.inference_mode():
            ksample(ctx, 3)
        sync()
    r["sync_sites_bare_1step"] = sync_sites(st["fwd_inf"])
    r["sync_sites_sampler_3steps"] = sync_sites(sampler3)
    log(f"  sync sites (bare 1 step): {r['sync_sites_bare_1step']}")
    log(f"  sync sites (sampler 3 steps): {r['sync_sites_sampler_3steps']}")


def phase_profile(st, tables):
    r, ctx, label = st["r"], st["ctx"], st["r"]["label"]
    ensure_loaded(st)
    r["profile_bare"] = profile_bare(st["fwd_inf"], A.prof_steps, label, tables)
    shown = ("profiled_cpu_ms_per_step", "profiled_host_ms_per_step", "aten_ops_per_step",
             "top_level_aten_ops_per_step", "self_cpu_ms_per_step", "gpu_kernels_per_step", "gpu_kernel_ms_per_step",
             "launch_calls_per_step", "sync_calls_per_step", "memcpy_per_step", "local_scalar_dense_per_step")
    log(f"  {label} profiler (bare): {json.dumps({x: r['profile_bare'][x] for x in shown})}")
    pa = profile_sampler(ctx, A_STEPS[0], label, tables)
    pb = profile_sampler(ctx, A_STEPS[1], label, tables)
    r["profile_sampler_per_step"] = diff_profiles(pa, pb, A_STEPS[1] - A_STEPS[0])
    r["profile_sampler_runs"] = {str(A_STEPS[0]): pa, str(A_STEPS[1]): pb}
    log(f"  {label} profiler (sampler, per step from the {A_STEPS[0]}- vs {A_STEPS[1]}-step difference): "
        f"{json.dumps(r['profile_sampler_per_step'])}")


def phase_after(st):
    """The same timings again, now that torch.profiler has run in this process: shows what it leaves behind."""
    r, ctx = st["r"], st["ctx"]
    ensure_loaded(st)
    aft = {"inference_mode_b2": time_steps(st["fwd_inf"], A.timed)}
    ts = time_sampler(ctx, A.sampler_steps, 2)
    aft[f"sampler_{A.sampler_steps}_steps_ms"] = [round(x, 1) for x in ts]
    aft["sampler_ms_per_step_incl_fixed"] = round(statistics.median(ts) / A.sampler_steps, 3)
    r["after_profiler"] = aft
    log(f"  {r['label']} after profiler: {aft}")


def fmt_table(results):
    rows = []
    hdr = ("wl", "wall", "host", "gpu_ev", "pipe", "graph", "graph_host", "kern/step", "kern_ms", "prof_host",
           "launch_ms", "py_gap", "aten_self", "aten_ops", "modules", "syncs", "smp/step", "smp_fixed", "smp_over",
           "after:wall", "after:smp")
    rows.append(hdr)
    for r in results:
        b = r["bare"]["inference_mode_b2"]
        g = r.get("cuda_graph_b2", {})
        p = r["profile_bare"]
        s = r["sampler"]
        sc = p["self_cpu_ms_per_step"]
        nsync = (sum(p["sync_calls_per_step"].values())
                 + sum(v for kk, v in p["memcpy_per_step"].items() if "DtoH" in kk))
        rows.append((r["label"], b["wall_ms"], b["host_ms"], b["gpu_event_ms"], b["pipelined_ms"],
                     g.get("wall_ms", g.get("error", "-")[:12] if g else "-"), g.get("host_ms", "-"),
                     p["gpu_kernels_per_step"], round(p["gpu_kernel_ms_per_step"], 2),
                     round(p["profiled_host_ms_per_step"], 2), round(p["launch_cpu_ms_per_step"], 2),
                     sc.get("python_between_ops", 0), sc.get("aten_dispatch_self", 0), p["aten_ops_per_step"],
                     r.get("module_calls_per_step"), nsync,
                     s["ms_per_step_slope"], s["fixed_ms_per_run"], s["overhead_vs_bare_pipelined_ms_per_step"],
                     r.get("after_profiler", {}).get("inference_mode_b2", {}).get("wall_ms"),
                     r.get("after_profiler", {}).get("sampler_ms_per_step_incl_fixed")))
    w = [max(len(str(row[i])) for row in rows) for i in range(len(hdr))]
    return "\n".join("  ".join(str(v).rjust(w[i]) for i, v in enumerate(row)) for row in rows)


def main():
    env = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
           "device": torch.cuda.get_device_name(0) if CUDA else "cpu", "comfy_device": str(DEV),
           "cudnn": torch.backends.cudnn.version() if CUDA else None,
           "attention": "pytorch" if mm.pytorch_attention_enabled() else "other",
           "vram_state": str(mm.vram_state), "cpu_count": os.cpu_count()}
    try:
        import comfyui_version
        env["comfyui"] = comfyui_version.__version__
    except Exception:  # noqa: BLE001
        pass
    log("env:", json.dumps(env))
    tables = []
    results = []
    states = []
    wls = [("W1", A.ckpt_w1, A.w1_size), ("W2", A.ckpt_w2, A.w2_size)]

    def dump(extra=None):
        with open(os.path.join(OUT, "profile_step.json"), "w") as f:
            json.dump({"env": env, "results": results, **(extra or {})}, f, indent=1, default=str)

    log("\n##### phase 1: timings, no profiler yet")
    for label, ckpt, size in wls:
        if not ckpt:
            continue
        if not os.path.exists(ckpt):
            log(f"{label}: {ckpt} missing, skipped")
            continue
        t0 = time.perf_counter()
        st = setup(label, ckpt, size)
        phase_clean(st)
        st["r"]["phase1_s"] = round(time.perf_counter() - t0, 1)
        states.append(st)
        results.append(st["r"])
        dump()
    log("\n##### phase 2: torch.profiler")
    for st in states:
        t0 = time.perf_counter()
        phase_profile(st, tables)
        st["r"]["phase2_s"] = round(time.perf_counter() - t0, 1)
        dump()
    log("\n##### phase 3: the phase-1 timings again, after the profiler ran")
    for st in states:
        phase_after(st)
    dump()
    with open(os.path.join(OUT, "key_averages.txt"), "w") as f:
        f.write("\n\n".join(tables))
    pys = {}
    if A.pyspy:
        ckpts = {lb: c for lb, c, _ in wls if c and os.path.exists(c)}
        sizes = {lb: s for lb, _, s in wls}
        for t in [x for x in A.pyspy_targets.split(",") if x]:
            t0 = time.perf_counter()
            pys[t] = run_pyspy(t, ckpts, sizes)
            log(f"\n=== py-spy {t} ({time.perf_counter() - t0:.0f}s): samples={pys[t].get('samples')} "
                f"err={pys[t].get('error')} rc={pys[t].get('pyspy_rc')} {pys[t].get('child_steps_line')}")
            for n, c, pct in pys[t].get("top_own", []):
                log(f"  {pct:5.1f}%  {c:6d}  {n}")
            if pys[t].get("pyspy_rc"):
                log("  py-spy said: " + pys[t].get("pyspy_stderr_tail", ""))
    dump({"pyspy": pys})
    log("\n=== summary (ms per UNet step, batch 2 = cond+uncond; wall/host/gpu_ev/pipe = bare forward under "
        "inference_mode; graph = CUDA graph replay; kern = GPU kernels from the profiler; py_gap/aten_self/launch = "
        "profiled self CPU ms; syncs = sync calls + DtoH copies per step; smp = common_ksampler slope, fixed ms per "
        "run, and slope minus bare pipelined; after: = bare wall and sampler ms/step re-timed after the profiler ran)")
    log(fmt_table(results))


if __name__ == "__main__":
    if A.child:
        child_main()
    else:
        main()
