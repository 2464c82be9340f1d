"""Patch of ComfyUI 0.33's RAM-pressure cache hook (``comfy.memory_management``): one release callback per worker."""

from __future__ import annotations

import sys
import threading
from typing import Any, Callable

from ..scheduling import worker_context
from .base import Comfy, Patch, first_problem, require_parameters, require_signature, uses


class RamReleasePerWorker(Patch):
    name = "ram-release-per-worker"
    replaces = "comfy.memory_management.set_ram_cache_release_state / extra_ram_release (ComfyUI 0.33)"
    why = ("0.33's executor puts its RAM-pressure cache's release callback in a module global when a prompt starts "
           "and clears it when it ends; with several workers the last one wins, so a worker short of RAM emptied "
           "another worker's cache from the wrong thread, or nothing at all. Each worker now registers and calls "
           "its own; the headroom ComfyUI reads is the largest of the running workers'")
    checked_on = ("0.33.0",)

    def check(self, comfy: Comfy) -> str | None:
        mem = sys.modules.get("comfy.memory_management")
        if mem is None or not hasattr(mem, "set_ram_cache_release_state"):
            return None  # 0.3.75: no RAM-pressure cache, nothing to patch
        return first_problem(
            lambda: require_signature(mem.set_ram_cache_release_state, "set_ram_cache_release_state", "callback",
                                      "headroom"),
            lambda: require_parameters(mem.extra_ram_release, "extra_ram_release", "target", "free_active"),
            lambda: uses(mem.set_ram_cache_release_state, "extra_ram_release_callback", "RAM_CACHE_HEADROOM"),
        )

    def _apply(self, comfy: Comfy) -> None:
        mem = sys.modules.get("comfy.memory_management")
        if mem is None or not hasattr(mem, "set_ram_cache_release_state"):
            return
        original_set = mem.set_ram_cache_release_state
        original_release = mem.extra_ram_release
        lock = threading.Lock()
        running: dict[int, tuple[Callable[..., Any], int]] = {}

        def set_ram_cache_release_state(callback: Callable[..., Any] | None, headroom: int) -> None:
            ctx = worker_context.current()
            if ctx is None:
                return original_set(callback, headroom)
            with lock:
                if callback is None:
                    running.pop(ctx.index, None)
                else:
                    running[ctx.index] = (callback, max(0, int(headroom)))
                mem.RAM_CACHE_HEADROOM = max((h for _, h in running.values()), default=0)
            return None

        def extra_ram_release(target: int, free_active: bool = False) -> Any:
            ctx = worker_context.current()
            if ctx is None:
                return original_release(target, free_active=free_active)
            entry = running.get(ctx.index)
            return 0 if entry is None else entry[0](target, free_active=free_active)

        self.log.replace(mem, "RAM_CACHE_HEADROOM", mem.RAM_CACHE_HEADROOM)  # restored by undo
        self.log.replace_everywhere(mem, "set_ram_cache_release_state", set_ram_cache_release_state)
        self.log.replace_everywhere(mem, "extra_ram_release", extra_ram_release)
