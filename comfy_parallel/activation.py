"""Turn the multi-device server on inside an imported ComfyUI, from the launcher or from the custom node."""

from __future__ import annotations

import logging
import sys
from types import ModuleType

from .comfy_adapter import Adapter, AdapterError, Comfy, active
from .comfy_adapter.model_management import dynamic_vram_problem
from .server.multigpu import MultiDeviceServer
from .settings import Settings

log = logging.getLogger("comfy_parallel")


def activate(settings: Settings, main_module: ModuleType | None = None) -> Adapter | None:
    """Patch ComfyUI for ``settings``; with the switch off or one device, patch nothing (stock ComfyUI)."""
    if not settings.enabled:
        log.info("comfy-parallel: COMFY_MULTI_GPU_SCHED is off; running stock ComfyUI (no patches)")
        return None
    if len(settings.devices) <= 1:
        label = settings.devices[0].label if settings.devices else "none"
        if settings.cuda_graphs == "on" and not settings.cpu_mode:
            _graphs_only(Comfy.from_sys_modules(main_module), settings.allow_unchecked_comfyui)
            log.info("comfy-parallel: one device (%s); stock ComfyUI plus CUDA graph replay (--cuda-graphs on)",
                     label)
            return None
        log.info("comfy-parallel: one device (%s); running stock ComfyUI (no patches)", label)
        return None
    if active() is not None:
        log.info("comfy-parallel: already active in this process")
        return active()
    comfy = Comfy.from_sys_modules(main_module)
    if not settings.cpu_mode and (problem := dynamic_vram_problem()) is not None:
        raise AdapterError(problem)
    adapter = Adapter(comfy, MultiDeviceServer(settings), allow_unchecked=settings.allow_unchecked_comfyui).apply()
    log.info("comfy-parallel: ComfyUI %s patched (%s)", comfy.version, ", ".join(adapter.applied))
    if settings.switch_interval_ms is not None:  # process-wide, like the workers that share the GIL
        sys.setswitchinterval(settings.switch_interval_ms / 1000)
        log.info("comfy-parallel: GIL switch interval %g ms (--switch-interval-ms)", settings.switch_interval_ms)
    return adapter


def _graphs_only(comfy: Comfy, allow_unchecked: bool) -> None:
    """``--cuda-graphs on`` with one device: the graph patch alone, which needs no worker machinery."""
    from .comfy_adapter import PatchStatus, gate
    from .comfy_adapter.cuda_graphs import CudaGraphs

    patch = CudaGraphs(concurrent=False)
    status = PatchStatus(patch.name, patch.replaces, patch.why, patch.checked_on, patch.check(comfy))
    refusal = gate(comfy, [status], allow_unchecked)
    if refusal is not None:
        raise AdapterError(refusal)
    patch.apply(comfy)
