"""Every change comfy-parallel makes to ComfyUI, in the order they are applied, grouped by ComfyUI subsystem.

Each patch fixes one row of DESIGN.md section 3 (process-global state that breaks with N concurrent workers) or
opens one entry point (worker start, routes, listeners). The worker-state patches fall back to ComfyUI's own
globals on threads that are not device workers, so code on the event loop thread behaves as in stock ComfyUI.

| module | ComfyUI subsystem |
|---|---|
| prompt_server | server.PromptServer, main.prompt_worker: entry points and per-worker server attributes |
| progress | comfy_execution.progress |
| sampling | comfy.sample (noise) |
| attention | comfy.ops attention (torch's process-wide SDPA backend order) |
| model_patcher | ModelPatcher's switch between weight-patch sets (LoRA on/off) |
| model_management | comfy.model_management (interrupts, loaded models, cache flushes, devices, load counts, VRAM cap) |
| ram_cache | comfy.memory_management's RAM-pressure cache hook (0.33) |
| garbage_collection | main.prompt_worker's periodic gc.collect() |
| save_image | folder_paths, SaveImage (file numbers) |
| shared_weights | comfy.sd / nodes loaders, ModelPatcher, comfy.utils (one host copy per file) |
| cuda_graphs | the SD1.x/SDXL UNet's forward |
"""

from __future__ import annotations

from .attention import AttentionPriorityAtomic
from .base import CHECKED, Patch
from .garbage_collection import GcOncePerInterval
from .model_management import (CountModelLoads, DevicesPerWorker, EmptyCachePerDevice, InterruptPerWorker,
                               LoadedModelsPerWorker, PerWorkerList, WorkerVramLimit)
from .model_patcher import PatchSwitchInPlace
from .progress import ProgressRegistryPerWorker, ProgressStateToSubmitter
from .prompt_server import (DeviceInExecutionStart, DeviceWorkers, EntryPorts, HookedPatch, QuietRetriedAttempt,
                            ScopedQueueStatus, ServerHooks, ServerSetup, ServerWorkerAttrs, WebsocketSendPerClient)
from .ram_cache import RamReleasePerWorker
from .sampling import SeededGeneratorPerCall
from .save_image import UniqueSaveCounters

__all__ = ["CHECKED", "PerWorkerList", "ServerHooks", "all_patches"]

WORKER_STATE_PATCHES: tuple[type[Patch], ...] = (
    ServerWorkerAttrs,
    ProgressRegistryPerWorker,
    ProgressStateToSubmitter,
    SeededGeneratorPerCall,
    AttentionPriorityAtomic,
    InterruptPerWorker,
    LoadedModelsPerWorker,
    EmptyCachePerDevice,
    DevicesPerWorker,
    RamReleasePerWorker,
    GcOncePerInterval,
    UniqueSaveCounters,
    PatchSwitchInPlace,
    CountModelLoads,
)
SERVER_PATCHES: tuple[type[HookedPatch], ...] = (DeviceWorkers, ServerSetup, EntryPorts, ScopedQueueStatus,
                                               WebsocketSendPerClient, QuietRetriedAttempt)


def all_patches(hooks: ServerHooks | None) -> list[Patch]:
    patches: list[Patch] = [cls() for cls in WORKER_STATE_PATCHES]
    if hooks is not None:
        patches += [cls(hooks) for cls in SERVER_PATCHES]
    # after quiet-retried-attempt, whose check reads the original PromptExecutor.add_message
    patches.append(DeviceInExecutionStart())
    store = getattr(hooks, "weight_store", None)
    if store is not None:
        from .shared_weights import shared_weight_patches

        patches += shared_weight_patches(store)
    settings = getattr(hooks, "settings", None)
    if settings is not None and getattr(settings, "worker_vram_limit", None):
        patches.append(WorkerVramLimit(settings.worker_vram_limit))
    if settings is not None and settings.graphs_enabled:
        from .cuda_graphs import CudaGraphs

        patches.append(CudaGraphs(max_graphs=settings.cuda_graphs_max))
    return patches
