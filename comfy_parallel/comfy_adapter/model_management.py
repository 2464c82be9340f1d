"""Patches of ``comfy.model_management``'s process-wide state: the interrupt flag, the loaded-model list and the
CUDA cache flush become per worker."""

from __future__ import annotations

import threading
from collections.abc import MutableSequence
from typing import Any

from .. import worker_context
from .base import CHECKED, Comfy, Patch, require_callables, uses


class InterruptPerWorker(Patch):
    name = "interrupt-per-worker"
    replaces = ("comfy.model_management.interrupt_current_processing / processing_interrupted / "
                "throw_exception_if_processing_interrupted")
    why = ("one flag for the process: an interrupt stopped whichever worker checked first, and a prompt "
           "starting on one GPU cleared another GPU's pending interrupt")
    checked_on = CHECKED
    FUNCS = ("interrupt_current_processing", "processing_interrupted", "throw_exception_if_processing_interrupted")

    def check(self, comfy: Comfy) -> str | None:
        return require_callables(comfy.model_management, *self.FUNCS, "InterruptProcessingException")

    def _apply(self, comfy: Comfy) -> None:
        mm = comfy.model_management
        original_set = mm.interrupt_current_processing
        original_get = mm.processing_interrupted
        original_throw = mm.throw_exception_if_processing_interrupted

        def interrupt_current_processing(value: bool = True) -> None:
            ctx = worker_context.current()
            if ctx is not None:
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
        return require_callables(comfy.model_management, "soft_empty_cache")

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
            with lock:
                return original(force)

        self.log.replace_everywhere(mm, "soft_empty_cache", soft_empty_cache)
