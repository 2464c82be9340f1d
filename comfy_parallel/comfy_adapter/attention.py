"""Patch of ComfyUI's attention entry (``comfy.ops.scaled_dot_product_attention``): one backend order per call."""

from __future__ import annotations

import inspect
import sys
import threading
from typing import Any

from .base import CHECKED, Comfy, Patch, first_problem, require_modules, require_signature, uses


class AttentionPriorityAtomic(Patch):
    name = "attention-priority-atomic"
    replaces = "comfy.ops.scaled_dot_product_attention, torch.nn.functional.scaled_dot_product_attention"
    why = ("On CUDA, ComfyUI sets torch's process-wide SDPA backend priority (flash first) around each large "
           "attention call and restores it after (torch.nn.attention.sdpa_kernel(..., set_priority=True)); small "
           "calls use the order as it stands, torch's default (cuDNN first on Hopper). Two workers entering and "
           "leaving at once left ComfyUI's order in place for good (measured on an H200: flash before cuDNN), so "
           "small attention calls (batch 1 and the lowest-resolution UNet blocks: cfg 1, area conditioning, a "
           "hires first pass) ran other kernels than in stock ComfyUI and images differed by 3-4 levels. One "
           "lock makes each CUDA attention call's set-launch-restore atomic, as in stock's single prompt thread; "
           "the kernels run asynchronously, so the lock is held only while they are launched")
    checked_on = CHECKED

    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.RLock()

    def check(self, comfy: Comfy) -> str | None:
        problem = require_modules("comfy.ops")
        if problem:
            return problem
        ops = sys.modules["comfy.ops"]
        attention = sys.modules.get("comfy.ldm.modules.attention")
        return first_problem(
            lambda: require_signature(ops.scaled_dot_product_attention, "comfy.ops.scaled_dot_product_attention",
                                      "q", "k", "v", "args", "kwargs"),
            # the UNet's attention looks the function up on comfy.ops at each call, so replacing it reaches it
            lambda: uses(inspect.unwrap(attention.attention_pytorch), "ops", "scaled_dot_product_attention")
            if attention else None,
        )

    def _apply(self, comfy: Comfy) -> None:
        import torch
        import torch.nn.functional as functional

        ops = sys.modules["comfy.ops"]
        lock = self.lock
        comfy_sdpa = ops.scaled_dot_product_attention
        torch_sdpa = functional.scaled_dot_product_attention

        def exclusive(q: Any) -> bool:
            return bool(getattr(q, "is_cuda", False)) and not torch.compiler.is_compiling()

        def scaled_dot_product_attention(q: Any, k: Any, v: Any, *args: Any, **kwargs: Any) -> Any:
            if not exclusive(q):
                return comfy_sdpa(q, k, v, *args, **kwargs)
            with lock:
                return comfy_sdpa(q, k, v, *args, **kwargs)

        def torch_scaled_dot_product_attention(query: Any, key: Any, value: Any, *args: Any, **kwargs: Any) -> Any:
            if not exclusive(query):
                return torch_sdpa(query, key, value, *args, **kwargs)
            with lock:
                return torch_sdpa(query, key, value, *args, **kwargs)

        scaled_dot_product_attention.__wrapped__ = comfy_sdpa  # type: ignore[attr-defined]
        torch_scaled_dot_product_attention.__wrapped__ = torch_sdpa  # type: ignore[attr-defined]
        self.log.replace(ops, "scaled_dot_product_attention", scaled_dot_product_attention)
        self.log.replace(functional, "scaled_dot_product_attention", torch_scaled_dot_product_attention)
