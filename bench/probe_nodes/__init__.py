"""Bench-only custom node: record every UNet call of a sampler (inputs, output, the calling thread's torch state).

``ProbeUNetCalls`` wraps a MODEL with a UNet function wrapper that appends one JSON line per call to
``<output>/probe/<label>.jsonl``: digests of the input latent, timestep, conditioning and output, the batch's
cond/uncond layout, and the torch settings that choose kernels (SDPA backends and their priority, matmul and cuDNN
flags, stream, thread). Comparing two servers' files for one prompt shows the first call where they part and
whether its inputs already differed. Used by bench/gpu_check_033.py --probe (issue 13's identity question).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from typing import Any

import folder_paths
import torch


def _digest(t: Any) -> str | None:
    if not isinstance(t, torch.Tensor):
        return None
    return hashlib.sha256(t.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()[:12]


def _state() -> dict:
    b = torch.backends
    state = {
        "thread": threading.current_thread().name,
        "device": torch.cuda.current_device() if torch.cuda.is_available() else None,
        "stream": torch.cuda.current_stream().cuda_stream if torch.cuda.is_available() else None,
        "inference": torch.is_inference_mode_enabled(),
        "grad": torch.is_grad_enabled(),
        "autocast": torch.is_autocast_enabled("cuda") if torch.cuda.is_available() else None,
        "fp16_reduced": b.cuda.matmul.allow_fp16_reduced_precision_reduction,
        "bf16_reduced": b.cuda.matmul.allow_bf16_reduced_precision_reduction,
        "tf32": b.cuda.matmul.allow_tf32,
        "fp32_precision": torch.get_float32_matmul_precision(),
        "cudnn": [b.cudnn.enabled, b.cudnn.benchmark, b.cudnn.deterministic, b.cudnn.allow_tf32],
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "sdp": [b.cuda.flash_sdp_enabled(), b.cuda.mem_efficient_sdp_enabled(), b.cuda.math_sdp_enabled(),
                b.cuda.cudnn_sdp_enabled()],
        "threads": torch.get_num_threads(),
    }
    try:
        state["sdp_priority"] = list(torch._C._get_sdp_priority_order())
    except Exception:
        state["sdp_priority"] = None
    try:
        state["blas"] = str(b.cuda.preferred_blas_library())
    except Exception:
        state["blas"] = None
    return state


class ProbeUNetCalls:
    CATEGORY = "bench"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "wrap"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"model": ("MODEL",), "label": ("STRING", {"default": "probe"})}}

    def wrap(self, model: Any, label: str) -> tuple:
        path = os.path.join(folder_paths.get_output_directory(), "probe", f"{label}.jsonl")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        calls = {"n": 0}

        def wrapper(apply_model: Any, args: dict) -> Any:
            x, t, c = args["input"], args["timestep"], args["c"]
            out = apply_model(x, t, **c)
            row = {"call": calls["n"], "shape": list(x.shape), "x": _digest(x), "t": _digest(t),
                   "cond_or_uncond": args.get("cond_or_uncond"),
                   "c": {k: _digest(v) for k, v in c.items() if isinstance(v, torch.Tensor)},
                   "out": _digest(out), "out_abs_sum": float(out.detach().float().abs().sum()), "state": _state()}
            calls["n"] += 1
            with open(path, "a") as f:
                f.write(json.dumps(row) + "\n")
            return out

        clone = model.clone()
        clone.set_model_unet_function_wrapper(wrapper)
        return (clone,)


NODE_CLASS_MAPPINGS = {"ProbeUNetCalls": ProbeUNetCalls}
