"""Patches of ``comfy.model_management``'s process-wide state: the interrupt flag, the loaded-model list and the
CUDA cache flush become per worker."""

from __future__ import annotations

import sys
import threading
from collections.abc import MutableSequence
from typing import Any

from ..scheduling import device_gate, worker_context
from .base import CHECKED, Comfy, Patch, first_problem, require_callables, require_signature, uses


class InterruptPerWorker(Patch):
    name = "interrupt-per-worker"
    replaces = ("comfy.model_management.interrupt_current_processing / processing_interrupted / "
                "throw_exception_if_processing_interrupted")
    why = ("one flag for the process: an interrupt stopped whichever worker checked first, and a prompt "
           "starting on one GPU cleared another GPU's pending interrupt; the executor's clear as it starts a "
           "prompt also dropped an interrupt sent after the prompt showed as running (WorkerContext.begin_prompt)")
    checked_on = CHECKED
    FUNCS = ("interrupt_current_processing", "processing_interrupted", "throw_exception_if_processing_interrupted")

    def check(self, comfy: Comfy) -> str | None:
        mm = comfy.model_management
        return first_problem(
            lambda: require_callables(mm, *self.FUNCS, "InterruptProcessingException"),
            lambda: require_signature(mm.interrupt_current_processing, "interrupt_current_processing", "value"),
            lambda: require_signature(mm.processing_interrupted, "processing_interrupted"),
            lambda: require_signature(mm.throw_exception_if_processing_interrupted,
                                      "throw_exception_if_processing_interrupted"),
        )

    def _apply(self, comfy: Comfy) -> None:
        mm = comfy.model_management
        original_set = mm.interrupt_current_processing
        original_get = mm.processing_interrupted
        original_throw = mm.throw_exception_if_processing_interrupted

        def interrupt_current_processing(value: bool = True) -> None:
            ctx = worker_context.current()
            if ctx is not None:
                if not value and ctx.take_start_clear():  # see WorkerContext.begin_prompt
                    return
                ctx.set_interrupt(value)
                return
            # Not a worker (an HTTP handler, a custom node's thread): stock semantics, every worker.
            original_set(value)
            for other in worker_context.all_contexts():
                other.set_interrupt(value)

        def processing_interrupted() -> bool:
            ctx = worker_context.current()
            return original_get() if ctx is None else ctx.interrupted()

        def throw_exception_if_processing_interrupted() -> None:
            ctx = worker_context.current()
            if ctx is None:
                return original_throw()
            if ctx.interrupted():
                ctx.set_interrupt(False)
                raise mm.InterruptProcessingException()

        self.log.replace_everywhere(mm, "interrupt_current_processing", interrupt_current_processing)
        self.log.replace_everywhere(mm, "processing_interrupted", processing_interrupted)
        self.log.replace_everywhere(mm, "throw_exception_if_processing_interrupted",
                                    throw_exception_if_processing_interrupted)


class PerWorkerList(MutableSequence):
    """A list that is a different list in each worker thread; other threads see ``fallback``."""

    def __init__(self, fallback: list) -> None:
        self.fallback = fallback

    def _list(self) -> list:
        ctx = worker_context.current()
        return self.fallback if ctx is None else ctx.loaded_models

    def __getitem__(self, i: Any) -> Any:
        return self._list()[i]

    def __setitem__(self, i: Any, value: Any) -> None:
        self._list()[i] = value

    def __delitem__(self, i: Any) -> None:
        del self._list()[i]

    def __len__(self) -> int:
        return len(self._list())

    def __iter__(self) -> Any:
        return iter(self._list())

    def insert(self, i: int, value: Any) -> None:
        self._list().insert(i, value)

    def index(self, value: Any, *args: Any) -> int:  # type: ignore[override]
        return self._list().index(value, *args)

    def copy(self) -> list:
        """ComfyUI 0.33's ``unload_model_and_clones`` iterates ``current_loaded_models.copy()``."""
        return list(self._list())

    def clear(self) -> None:
        self._list().clear()

    def __repr__(self) -> str:
        return f"PerWorkerList({self._list()!r})"


class LoadedModelsPerWorker(Patch):
    name = "loaded-models-per-worker"
    replaces = "comfy.model_management.current_loaded_models"
    why = ("one list mutated by index from N threads corrupts it, and unload_all_models (/free) unloaded every "
           "GPU; each worker now manages only the models loaded on its device")
    checked_on = CHECKED

    def check(self, comfy: Comfy) -> str | None:
        mm = comfy.model_management
        if not isinstance(getattr(mm, "current_loaded_models", None), (list, PerWorkerList)):
            return "comfy.model_management.current_loaded_models is not a list"
        return uses(mm.free_memory, "current_loaded_models")

    def _apply(self, comfy: Comfy) -> None:
        mm = comfy.model_management
        self.log.replace(mm, "current_loaded_models", PerWorkerList(mm.current_loaded_models))


class EmptyCachePerDevice(Patch):
    name = "empty-cache-per-device"
    replaces = "comfy.model_management.soft_empty_cache"
    why = ("torch.cuda.empty_cache() releases cached blocks of every device and stalls the other workers; a "
           "worker keeps its cached blocks for reuse (ComfyUI already counts them as free) and releases them only "
           "for an explicit /free or a forced call, one device at a time")
    checked_on = CHECKED

    def check(self, comfy: Comfy) -> str | None:
        return first_problem(
            lambda: require_callables(comfy.model_management, "soft_empty_cache"),
            lambda: require_signature(comfy.model_management.soft_empty_cache, "soft_empty_cache", "force"),
        )

    def _apply(self, comfy: Comfy) -> None:
        mm = comfy.model_management
        original = mm.soft_empty_cache
        lock = threading.Lock()

        def soft_empty_cache(force: bool = False) -> None:
            ctx = worker_context.current()
            if ctx is None or ctx.spec.kind != "cuda":
                return original(force)
            if not (force or ctx.allow_empty_cache):
                return None
            ctx.allow_empty_cache = False
            # emptying the cache frees device memory, which a CUDA graph capture on this GPU must not see
            with lock, device_gate.gate_of(ctx.spec.ordinal).shared():
                return original(force)

        self.log.replace_everywhere(mm, "soft_empty_cache", soft_empty_cache)


def device_for_option(option: str, devices: list, own: Any, index: int) -> Any:
    """What ``gpu:N`` means inside worker ``index`` on ``own``: that device when it is this worker's, else an error.

    ComfyUI numbers the options over every GPU of the process; the GPU of another worker must never be used
    behind its back (its VRAM and queue belong to that worker).
    """
    try:
        wanted = devices[int(option[len("gpu:"):])]
    except (ValueError, IndexError):
        return None  # malformed or out of range: ComfyUI's own answer (the node falls back to its default)
    if wanted == own:
        return wanted
    raise ValueError(f"device option {option!r} names {wanted}, which another comfy-parallel worker owns; this "
                     f"prompt runs on {own} (device {index}). Send the prompt to that GPU instead (X-TARGET-GPU "
                     "header, entry port or /gpuN/ prefix) or choose 'default'")


class DevicesPerWorker(Patch):
    name = "devices-per-worker"
    replaces = "comfy.model_management.get_all_torch_devices, resolve_gpu_device_option (ComfyUI 0.33)"
    why = ("ComfyUI 0.33's own multi-GPU features (MultiGPU CFG Split, Select Model/CLIP/VAE Device, "
           "unload_all_models) use every GPU of the process, and each of them belongs to a worker; inside a worker "
           "they see that worker's device only, and a node that names another worker's GPU fails with a clear "
           "error instead of using it")
    checked_on = ("0.33.0",)

    def check(self, comfy: Comfy) -> str | None:
        mm = comfy.model_management
        if not hasattr(mm, "get_all_torch_devices"):
            return None  # 0.3.75: no such features, nothing to patch
        return first_problem(
            lambda: require_signature(mm.get_all_torch_devices, "get_all_torch_devices", "exclude_current"),
            lambda: require_signature(mm.resolve_gpu_device_option, "resolve_gpu_device_option", "option"),
        )

    def _apply(self, comfy: Comfy) -> None:
        mm = comfy.model_management
        if not hasattr(mm, "get_all_torch_devices"):
            return
        original_all = mm.get_all_torch_devices
        original_resolve = mm.resolve_gpu_device_option

        def get_all_torch_devices(exclude_current: bool = False) -> list:
            ctx = worker_context.current()
            if ctx is None:
                return original_all(exclude_current)
            return [] if exclude_current else [mm.get_torch_device()]

        def resolve_gpu_device_option(option: str) -> Any:
            ctx = worker_context.current()
            if ctx is None or not isinstance(option, str) or not option.startswith("gpu:"):
                return original_resolve(option)
            return device_for_option(option, original_all(False), mm.get_torch_device(), ctx.index)

        self.log.replace_everywhere(mm, "get_all_torch_devices", get_all_torch_devices)
        self.log.replace_everywhere(mm, "resolve_gpu_device_option", resolve_gpu_device_option)


def dynamic_vram_problem() -> str | None:
    """Why this ComfyUI's model loading cannot serve several workers, or ``None``.

    ComfyUI 0.33 turns on DynamicVRAM (comfy-aimdo, ``ModelPatcherDynamic``) by default on NVIDIA GPUs. Its state
    is process-wide and reset after every node of any prompt (``model_prefetch.cleanup_prefetch_queues``,
    ``reset_cast_buffers``), and it decides host residency and pinning itself. Measured with two workers on one
    H200 (issue 13, two workers, shared weights off): 11 of 14 images differed from stock's, and with CUDA graphs
    off too a CUDA illegal memory access aborted the process. ``comfy-parallel serve`` starts such a ComfyUI with
    ``--disable-dynamic-vram``.
    """
    memory_management = sys.modules.get("comfy.memory_management")
    if getattr(memory_management, "aimdo_enabled", False):
        return ("ComfyUI runs with DynamicVRAM (comfy-aimdo), whose state is process-wide: with several workers it "
                "aborted the process (CUDA illegal memory access) and changed images. Start ComfyUI with "
                "--disable-dynamic-vram (comfy-parallel serve does so by itself)")
    return None


class CountModelLoads(Patch):
    name = "count-model-loads"
    replaces = "comfy.model_management.LoadedModel.model_load"
    why = ("a model moved onto a device is the cost the pool's affinity saves (pool.py); each worker now counts the "
           "loads onto its device and their bytes, for /multigpu/status and /metrics (model_load is also called for "
           "models already loaded: only one whose loaded size grew counts)")
    checked_on = CHECKED

    def check(self, comfy: Comfy) -> str | None:
        mm = comfy.model_management
        return first_problem(
            lambda: require_callables(mm, "LoadedModel"),
            lambda: require_callables(mm.LoadedModel, "model_load", "model_loaded_memory"),
            lambda: require_signature(mm.LoadedModel.model_load, "LoadedModel.model_load", "self",
                                      "lowvram_model_memory", "force_patch_weights"),
        )

    def _apply(self, comfy: Comfy) -> None:
        original = comfy.model_management.LoadedModel.model_load

        def loaded_bytes(loaded_model: Any) -> int:
            try:
                return int(loaded_model.model_loaded_memory())
            except Exception:  # a patcher without a size: nothing to count
                return 0

        def model_load(self_: Any, lowvram_model_memory: int = 0, force_patch_weights: bool = False) -> Any:
            ctx = worker_context.current()
            if ctx is None:
                return original(self_, lowvram_model_memory, force_patch_weights)
            before = loaded_bytes(self_)
            result = original(self_, lowvram_model_memory, force_patch_weights)
            grown = loaded_bytes(self_) - before
            if grown > 0:
                ctx.model_loads += 1
                ctx.model_load_bytes += grown
            return result

        self.log.replace(comfy.model_management.LoadedModel, "model_load", model_load)


def capped_free_memory(free: Any, limit: int, used: int) -> Any:
    """What ``get_free_memory`` answers a worker capped at ``limit`` bytes whose models hold ``used`` bytes."""
    room = max(0, limit - used)
    if isinstance(free, tuple):
        return tuple(min(int(x), room) for x in free)
    return min(int(free), room)


class WorkerVramLimit(Patch):
    name = "worker-vram-limit"
    replaces = "comfy.model_management.get_free_memory (with --worker-vram-limit)"
    why = ("ComfyUI plans model loads and unloads with the device's free memory; several workers on one large GPU "
           "(or a card shared with other work) then keep every model loaded. With a limit each CUDA worker sees at "
           "most the limit minus what its own loaded models hold, and unloads its models as on a card that size")
    checked_on = CHECKED

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def check(self, comfy: Comfy) -> str | None:
        mm = comfy.model_management
        return first_problem(
            lambda: require_callables(mm, "get_free_memory", "free_memory"),
            lambda: require_signature(mm.get_free_memory, "get_free_memory", "dev", "torch_free_too"),
            lambda: uses(mm.free_memory, "get_free_memory"),
        )

    def _apply(self, comfy: Comfy) -> None:
        mm = comfy.model_management
        original = mm.get_free_memory
        limit = self.limit

        def get_free_memory(dev: Any = None, torch_free_too: bool = False) -> Any:
            free = original(dev, torch_free_too)
            ctx = worker_context.current()
            if ctx is None or ctx.spec.kind != "cuda":
                return free
            device = dev if dev is not None else mm.get_torch_device()
            if getattr(device, "type", None) != "cuda":
                return free
            used = 0
            for lm in list(ctx.loaded_models):
                try:
                    if lm.device == device:
                        used += int(lm.model_loaded_memory())
                except Exception:  # a dead entry ComfyUI will clean up
                    continue
            return capped_free_memory(free, limit, used)

        self.log.replace_everywhere(mm, "get_free_memory", get_free_memory)
