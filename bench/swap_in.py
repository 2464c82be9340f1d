"""Swap-in speed of a shared host copy: host -> GPU GB/s of a checkpoint's diffusion model, in one process.

Measured against the same bytes moved by a plain ``tensor.to('cuda', non_blocking=True)`` from pinned memory
(per tensor, and as one buffer), against stock ComfyUI's own swap cycle (its unload copies the weights back to
new pageable CPU tensors, its reload copies them up again), and against the first load from disk.

usage (device machine): python3 bench/swap_in.py --comfyui /tmp/comfyui --ckpt sdxl_rand.safetensors --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def rss_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def profile_load(mp, sync) -> dict:  # type: ignore[no-untyped-def]
    """Where one load of a view spends its time: cProfile of ``load_models_gpu`` (top functions by own time)."""
    import cProfile
    import io
    import pstats

    import comfy.model_management as mm  # type: ignore[import-not-found]

    mm.unload_all_models()
    sync()
    prof = cProfile.Profile()
    t = time.perf_counter()
    prof.enable()
    mm.load_models_gpu([mp], force_full_load=True)
    sync()
    prof.disable()
    wall = time.perf_counter() - t
    mm.unload_all_models()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(25)
    lines = [ln for ln in out.getvalue().splitlines() if ln.strip()]
    print("\n".join(lines[:40]))
    return {"wall_s_profiled": round(wall, 3), "top_by_own_time": lines[:40]}


def partial_unload_check(mp, sync) -> dict:  # type: ignore[no-untyped-def]
    """ComfyUI asks a bulk-loaded view to free 1 GiB: the VRAM must really come back (the one buffer goes)."""
    import torch

    import comfy.model_management as mm  # type: ignore[import-not-found]
    from comfy_parallel.weights import store as weights

    mm.unload_all_models()
    mm.load_models_gpu([mp], force_full_load=True)
    sync()
    res = {"bulk_resident": weights.bulk_resident(mp.model), "allocated_loaded_gib": torch.cuda.memory_allocated()}
    # every parameter's device bytes are its host tensor's (a wrong offset would still run, with wrong weights)
    slots = mp.model.__dict__.get("_cp_slots", ())
    res["params_checked"] = len(slots)
    res["params_differing"] = sum(
        1 for module, name, host_ref in slots
        if not torch.equal(module._parameters[name].data, host_ref().data.to(module._parameters[name].device)))
    loaded = [lm for lm in mm.current_loaded_models if lm.model is mp][0]
    loaded.model_unload(memory_to_free=2**30)
    sync()
    res["allocated_after_gib"] = torch.cuda.memory_allocated()
    res["bulk_resident_after"] = weights.bulk_resident(mp.model)
    res["comfy_loaded_gib_after"] = mp.loaded_size()
    res["freed_gib"] = res["allocated_loaded_gib"] - res["allocated_after_gib"]
    for k in ("allocated_loaded_gib", "allocated_after_gib", "comfy_loaded_gib_after", "freed_gib"):
        res[k] = round(res[k] / 2**30, 3)
    mm.load_models_gpu([mp], force_full_load=True)  # and it loads again
    sync()
    res["reloaded_gib"] = round(mp.loaded_size() / 2**30, 3)
    mm.unload_all_models()
    sync()
    res["allocated_unloaded_gib"] = round(torch.cuda.memory_allocated() / 2**30, 3)
    print("partial unload check:", res)
    return res


def page_cache_swap_in(comfy_bundle, path: str, nbytes: int, cycle) -> dict:  # type: ignore[no-untyped-def]
    """--host-copy page-cache: loads copy from the file's pageable mapping, whose pages are dropped after each
    unload (the server drops them after every prompt), so every load maps them again from the page cache."""
    import comfy.model_management as mm  # type: ignore[import-not-found]
    import comfy.sd  # type: ignore[import-not-found]

    from comfy_parallel.comfy_adapter.shared_weights import shared_weight_patches
    from comfy_parallel.weights import store as weights
    from comfy_parallel.weights.store import WeightStore

    store = WeightStore(pin="auto", host_copy="page-cache")
    patches = shared_weight_patches(store)
    for p in patches:
        p.apply(comfy_bundle)
    res: dict = {}
    try:
        t = time.perf_counter()
        view, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(path, output_vae=True, output_clip=True)
        res["host_load_s"] = round(time.perf_counter() - t, 3)
        entry = store.entries()[0]
        res["host_gib"] = round(entry.host_bytes / 2**30, 3)
        res["page_cache_gib"] = round((entry.file_pages.nbytes if entry.file_pages else 0) / 2**30, 3)
        res["rss_after_host_load_gib"] = round(rss_gib(), 3)
        original_unload = mm.unload_all_models

        def unload_and_release() -> None:
            original_unload()
            store.release_file_pages()

        mm.unload_all_models = unload_and_release
        try:
            loads, unloads = cycle(view)
        finally:
            mm.unload_all_models = original_unload
        res["swap_in_gbps"] = round(nbytes / statistics.median(loads) / 1e9, 2)
        res["loads_s"] = [round(x, 3) for x in loads]
        res["unload_and_release_s"] = round(statistics.median(unloads), 4)
        res["rss_after_release_gib"] = round(rss_gib(), 3)
        res["bulk_resident"] = weights.bulk_resident(view.model)
    finally:
        mm.unload_all_models()
        for p in reversed(patches):
            p.undo()
    print("page cache:", res)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--comfyui", default="/tmp/comfyui")
    ap.add_argument("--ckpt", default="sdxl_rand.safetensors")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", default=os.environ.get("OUT") or "bench/results/local")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from comfy_parallel.comfy_adapter import Comfy, load_comfyui
    from comfy_parallel.comfy_adapter.shared_weights import shared_weight_patches
    from comfy_parallel.weights.store import WeightStore

    main_module = load_comfyui(Path(args.comfyui), ["--disable-all-custom-nodes", "--dont-print-server"])
    import torch

    import comfy.model_management as mm  # type: ignore[import-not-found]
    import comfy.sd  # type: ignore[import-not-found]
    import folder_paths  # type: ignore[import-not-found]

    path = folder_paths.get_full_path_or_raise("checkpoints", args.ckpt)
    res: dict = {"ckpt": args.ckpt, "file_gib": round(os.path.getsize(path) / 2**30, 3),
                 "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}

    def sync() -> None:
        torch.cuda.synchronize()

    def cycle(mp) -> tuple[list[float], list[float]]:  # type: ignore[no-untyped-def]
        loads, unloads = [], []
        for _ in range(args.repeat):
            sync()
            t = time.perf_counter()
            mm.load_models_gpu([mp], force_full_load=True)
            sync()
            loads.append(time.perf_counter() - t)
            t = time.perf_counter()
            mm.unload_all_models()
            sync()
            unloads.append(time.perf_counter() - t)
        return loads, unloads

    # 1. stock ComfyUI (no patches): first load from disk, then its unload/reload cycle
    res["rss_start_gib"] = round(rss_gib(), 3)
    t = time.perf_counter()
    mp, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(path, output_vae=True, output_clip=True)
    mm.load_models_gpu([mp], force_full_load=True)
    sync()
    res["stock_first_load_s"] = round(time.perf_counter() - t, 3)
    nbytes = mp.model_size()
    res["unet_gib"] = round(nbytes / 2**30, 3)
    mm.unload_all_models()
    loads, unloads = cycle(mp)
    res["stock_reload_gbps"] = round(nbytes / statistics.median(loads) / 1e9, 2)
    res["stock_unload_s"] = round(statistics.median(unloads), 3)
    res["rss_after_stock_gib"] = round(rss_gib(), 3)
    del mp, clip, vae
    mm.unload_all_models()
    mm.soft_empty_cache(True)

    # 2. comfy-parallel's shared host copy (pinned), a view per device
    comfy_bundle = Comfy.from_sys_modules(main_module)
    store = WeightStore(pin="on")
    patches = shared_weight_patches(store)
    for p in patches:
        p.apply(comfy_bundle)
    try:
        t = time.perf_counter()
        view, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(path, output_vae=True, output_clip=True)
        res["shared_host_load_s"] = round(time.perf_counter() - t, 3)
        entry = store.entries()[0]
        res["host_gib"], res["host_pinned"] = round(entry.host_bytes / 2**30, 3), entry.pinned
        # A/B/A/B in one process: all patches, then without view-bulk-load (one copy per tensor), and again
        bulk = next(p for p in patches if p.name == "view-bulk-load")
        runs = {}
        for label in ("bulk", "per_tensor", "bulk_again", "per_tensor_again"):
            if label.startswith("per_tensor"):
                bulk.undo()
            elif not bulk.applied:
                bulk.apply(comfy_bundle)
            loads, unloads = cycle(view)
            runs[label] = {"gbps": round(nbytes / statistics.median(loads) / 1e9, 2),
                           "loads_s": [round(x, 3) for x in loads], "unload_s": round(statistics.median(unloads), 4)}
        res["shared_runs"] = runs
        both = runs["bulk"]["loads_s"] + runs["bulk_again"]["loads_s"]
        res["shared_swap_in_gbps"] = round(nbytes / statistics.median(both) / 1e9, 2)  # median of both A runs
        res["shared_swap_in_s"] = both
        res["shared_unload_s"] = runs["bulk_again"]["unload_s"]
        per_tensor = runs["per_tensor"]["loads_s"] + runs["per_tensor_again"]["loads_s"]
        res["shared_per_tensor_gbps"] = round(nbytes / statistics.median(per_tensor) / 1e9, 2)
        if not bulk.applied:
            bulk.apply(comfy_bundle)
        res["rss_after_shared_gib"] = round(rss_gib(), 3)
        res["shared_load_profile"] = profile_load(view, sync)
        res["partial_unload_check"] = partial_unload_check(view, sync)

        # 3. the reference: the same host tensors, copied by hand
        host_unet = entry.host[0].model
        tensors = [p.data for p in host_unet.parameters()] + [b for b in host_unet.buffers()]
        times = []
        for _ in range(args.repeat):
            sync()
            t = time.perf_counter()
            gpu = [x.to("cuda", non_blocking=True) for x in tensors]
            sync()
            times.append(time.perf_counter() - t)
            del gpu
        copied = sum(x.numel() * x.element_size() for x in tensors)
        res["pinned_per_tensor_gbps"] = round(copied / statistics.median(times) / 1e9, 2)
        big = torch.empty(copied, dtype=torch.uint8).pin_memory()
        times = []
        for _ in range(args.repeat):
            sync()
            t = time.perf_counter()
            g = big.to("cuda", non_blocking=True)
            sync()
            times.append(time.perf_counter() - t)
            del g
        res["pinned_one_buffer_gbps"] = round(copied / statistics.median(times) / 1e9, 2)
        res["swap_in_vs_pinned_per_tensor"] = round(res["shared_swap_in_gbps"] / res["pinned_per_tensor_gbps"], 3)
        res["swap_in_vs_pinned_one_buffer"] = round(res["shared_swap_in_gbps"] / res["pinned_one_buffer_gbps"], 3)
        for run in runs.values():
            run["vs_pinned_per_tensor"] = round(run["gbps"] / res["pinned_per_tensor_gbps"], 3)
    finally:
        for p in reversed(patches):
            p.undo()
    mm.unload_all_models()
    del view, clip, vae, entry, store  # the RAM host copy goes before the page-cache one is built
    res["page_cache"] = page_cache_swap_in(comfy_bundle, path, nbytes, cycle)
    print(json.dumps(res, indent=2))
    (out / "swap_in.json").write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
