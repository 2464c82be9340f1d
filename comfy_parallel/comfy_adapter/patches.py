"""Every change comfy-parallel makes to ComfyUI, one class each.

Each patch fixes one row of DESIGN.md section 3 (process-global state that breaks with N concurrent workers) or
opens one entry point (worker start, routes, listeners). All were checked against ComfyUI 0.3.52 and 0.3.75.
The worker-state patches fall back to ComfyUI's own globals on threads that are not device workers, so code on
the event loop thread behaves as in stock ComfyUI.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import MutableSequence
from typing import Any, Callable, Iterable, Protocol

from .. import worker_context
from .base import Comfy, Patch, first_problem, require_callables

CHECKED = ("0.3.52", "0.3.75")
log = logging.getLogger("comfy_parallel.adapter")


class ServerHooks(Protocol):
    """What the multi-device server provides at ComfyUI's entry points (see comfy_parallel.server)."""

    def before_routes(self, prompt_server: Any) -> None: ...

    def after_routes(self, prompt_server: Any) -> None: ...

    def start_workers(self, prompt_server: Any, prompt_worker: Callable[[Any, Any], None]) -> None: ...

    def listen_addresses(self, addresses: list[tuple[str, int]]) -> list[tuple[str, int]]: ...

    def queue_updated(self, prompt_server: Any) -> None: ...


def _uses(func: Any, *names: str) -> str | None:
    code = getattr(func, "__code__", None)
    if code is None:
        return f"{func!r} is not a Python function"
    missing = [n for n in names if n not in code.co_names and n not in code.co_varnames]
    if missing:
        return f"{func.__qualname__} no longer refers to {', '.join(missing)}"
    return None


# --------------------------------------------------------------------------------------------------------------
# Worker state
# --------------------------------------------------------------------------------------------------------------

class _PerWorkerAttr:
    """Data descriptor: reads and writes go to the calling worker's context; other threads see the last write."""

    def __init__(self, attr: str) -> None:
        self.attr = attr

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        ctx = worker_context.current()
        if ctx is not None:
            return getattr(ctx, self.attr)
        return obj.__dict__.get(self.attr)

    def __set__(self, obj: Any, value: Any) -> None:
        ctx = worker_context.current()
        if ctx is not None:
            setattr(ctx, self.attr, value)
        obj.__dict__[self.attr] = value


class ServerWorkerAttrs(Patch):
    name = "server-worker-attrs"
    replaces = "server.PromptServer.client_id / last_node_id / last_prompt_id"
    why = ("one value for all workers sends one GPU's progress to another GPU's client; "
           "each worker now reads and writes its own")
    checked_on = CHECKED
    ATTRS = ("client_id", "last_node_id", "last_prompt_id")

    def check(self, comfy: Comfy) -> str | None:
        return first_problem(
            lambda: require_callables(comfy.server, "PromptServer"),
            lambda: require_callables(comfy.execution, "PromptExecutor"),
            lambda: _uses(comfy.server.PromptServer.__init__, "client_id", "last_node_id"),
            lambda: _uses(comfy.main.prompt_worker, "last_prompt_id"),
        )

    def _apply(self, comfy: Comfy) -> None:
        for attr in self.ATTRS:
            self.log.replace(comfy.server.PromptServer, attr, _PerWorkerAttr(attr))


class ProgressRegistryPerWorker(Patch):
    name = "progress-registry-per-worker"
    replaces = "comfy_execution.progress.get_progress_state / reset_progress_state"
    why = "a prompt starting on one GPU reset the progress registry of a prompt running on another"
    checked_on = CHECKED

    def check(self, comfy: Comfy) -> str | None:
        if comfy.progress is None:
            return "comfy_execution.progress is not imported"
        return first_problem(
            lambda: require_callables(comfy.progress, "get_progress_state", "reset_progress_state", "ProgressRegistry"),
            lambda: _uses(comfy.progress.reset_progress_state, "global_progress_registry"),
        )

    def _apply(self, comfy: Comfy) -> None:
        progress = comfy.progress
        assert progress is not None
        original_get = progress.get_progress_state
        original_reset = progress.reset_progress_state

        def get_progress_state() -> Any:
            ctx = worker_context.current()
            if ctx is None:
                return original_get()
            if ctx.progress_registry is None:
                # WARNING: mirrors progress.get_progress_state's lazy default (0.3.52-0.3.75).
                from comfy_execution.graph import DynamicPrompt

                ctx.progress_registry = progress.ProgressRegistry(prompt_id="", dynprompt=DynamicPrompt({}))
            return ctx.progress_registry

        def reset_progress_state(prompt_id: str, dynprompt: Any) -> None:
            ctx = worker_context.current()
            if ctx is None:
                return original_reset(prompt_id, dynprompt)
            # WARNING: mirrors progress.reset_progress_state (0.3.52-0.3.75).
            if ctx.progress_registry is not None:
                ctx.progress_registry.reset_handlers()
            ctx.progress_registry = progress.ProgressRegistry(prompt_id, dynprompt)

        self.log.replace_everywhere(progress, "get_progress_state", get_progress_state)
        self.log.replace_everywhere(progress, "reset_progress_state", reset_progress_state)


class _SubmitterOnly:
    """Stands in for the server inside one progress-handler call: messages without a client go to the submitter."""

    def __init__(self, server: Any) -> None:
        self._server = server

    def __getattr__(self, name: str) -> Any:
        return getattr(self._server, name)

    def send_sync(self, event: Any, data: Any, sid: Any = None) -> None:
        self._server.send_sync(event, data, sid if sid is not None else self._server.client_id)


class ProgressStateToSubmitter(Patch):
    name = "progress-state-to-submitter"
    replaces = "comfy_execution.progress.WebUIProgressHandler._send_progress_state (0.3.52 only)"
    why = ("ComfyUI 0.3.52 broadcasts progress_state to every websocket; with several devices running, clients "
           "see each other's prompts. 0.3.75 addresses the submitter itself; there this patch changes nothing")
    checked_on = CHECKED

    def check(self, comfy: Comfy) -> str | None:
        if comfy.progress is None:
            return "comfy_execution.progress is not imported"
        return first_problem(
            lambda: require_callables(comfy.progress, "WebUIProgressHandler"),
            lambda: require_callables(comfy.progress.WebUIProgressHandler, "_send_progress_state"),
        )

    def _apply(self, comfy: Comfy) -> None:
        handler = comfy.progress.WebUIProgressHandler  # type: ignore[union-attr]
        original = handler._send_progress_state
        if "client_id" in original.__code__.co_names:
            return  # this ComfyUI already sends progress_state to the submitting client only

        def _send_progress_state(self_: Any, prompt_id: str, nodes: Any) -> None:
            server = self_.server_instance
            if server is None:
                return original(self_, prompt_id, nodes)
            self_.server_instance = _SubmitterOnly(server)
            try:
                return original(self_, prompt_id, nodes)
            finally:
                self_.server_instance = server

        self.log.replace(handler, "_send_progress_state", _send_progress_state)


class SeededGeneratorPerCall(Patch):
    name = "seeded-generator-per-call"
    replaces = "torch.manual_seed, as ComfyUI uses it for noise (comfy.sample.prepare_noise, comfy.samplers, ...)"
    why = ("torch.manual_seed(seed) seeds and returns the process-wide CPU generator; two workers seeding and "
           "drawing at once interleave their draws, so the same seed gave different images. In a worker it "
           "still seeds as before but returns a private generator seeded alike, so the noise equals stock's")
    checked_on = CHECKED

    def check(self, comfy: Comfy) -> str | None:
        sample = sys.modules.get("comfy.sample")
        if sample is None:
            return "comfy.sample is not imported"
        return _uses(sample.prepare_noise, "manual_seed")

    def _apply(self, comfy: Comfy) -> None:
        import torch

        original = torch.manual_seed

        def manual_seed(seed: int) -> Any:
            generator = original(seed)
            if worker_context.current() is None:
                return generator
            return torch.Generator().manual_seed(int(seed))

        manual_seed.__wrapped__ = original  # type: ignore[attr-defined]
        self.log.replace(torch, "manual_seed", manual_seed)


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
        return _uses(mm.free_memory, "current_loaded_models")

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


# --------------------------------------------------------------------------------------------------------------
# Entry points into ComfyUI's server
# --------------------------------------------------------------------------------------------------------------

class _HookedPatch(Patch):
    def __init__(self, hooks: ServerHooks) -> None:
        super().__init__()
        self.hooks = hooks


class DeviceWorkers(_HookedPatch):
    name = "device-workers"
    replaces = "main.prompt_worker"
    why = "start_comfyui starts one worker thread; it now starts one worker per device, each bound to its device"
    checked_on = CHECKED

    def check(self, comfy: Comfy) -> str | None:
        return first_problem(
            lambda: require_callables(comfy.main, "prompt_worker", "start_comfyui"),
            lambda: _uses(comfy.main.start_comfyui, "prompt_worker"),
        )

    def _apply(self, comfy: Comfy) -> None:
        original = comfy.main.prompt_worker
        hooks = self.hooks

        def prompt_worker(q: Any, server_instance: Any) -> None:
            hooks.start_workers(server_instance, original)

        prompt_worker.__wrapped__ = original  # type: ignore[attr-defined]
        self.log.replace(comfy.main, "prompt_worker", prompt_worker)


class ServerSetup(_HookedPatch):
    name = "server-setup"
    replaces = "server.PromptServer.add_routes"
    why = ("install the per-device queues, the routing middleware, the /gpuN prefixes and the added routes "
           "while the app can still be changed")
    checked_on = CHECKED

    def check(self, comfy: Comfy) -> str | None:
        return first_problem(
            lambda: require_callables(comfy.server.PromptServer, "add_routes"),
            lambda: _uses(comfy.server.PromptServer.__init__, "routes", "app", "prompt_queue"),
            lambda: _uses(comfy.server.PromptServer.add_routes, "app", "routes"),
        )

    def _apply(self, comfy: Comfy) -> None:
        original = comfy.server.PromptServer.add_routes
        hooks = self.hooks

        def add_routes(self_: Any) -> None:
            hooks.before_routes(self_)
            original(self_)
            hooks.after_routes(self_)

        self.log.replace(comfy.server.PromptServer, "add_routes", add_routes)


class EntryPorts(_HookedPatch):
    name = "entry-ports"
    replaces = "server.PromptServer.start_multi_address"
    why = "open one extra listener per device (entry ports 8181..) on the same app"
    checked_on = CHECKED

    def check(self, comfy: Comfy) -> str | None:
        return require_callables(comfy.server.PromptServer, "start_multi_address")

    def _apply(self, comfy: Comfy) -> None:
        original = comfy.server.PromptServer.start_multi_address
        hooks = self.hooks

        async def start_multi_address(self_: Any, addresses: Iterable[tuple[str, int]], *args: Any,
                                      **kwargs: Any) -> Any:
            return await original(self_, hooks.listen_addresses(list(addresses)), *args, **kwargs)

        self.log.replace(comfy.server.PromptServer, "start_multi_address", start_multi_address)


class ScopedQueueStatus(_HookedPatch):
    name = "scoped-queue-status"
    replaces = "server.PromptServer.queue_updated"
    why = "a websocket opened for one device gets that device's queue length; untargeted sockets get the total"
    checked_on = CHECKED

    def check(self, comfy: Comfy) -> str | None:
        return require_callables(comfy.server.PromptServer, "queue_updated", "get_queue_info", "send_sync")

    def _apply(self, comfy: Comfy) -> None:
        hooks = self.hooks

        def queue_updated(self_: Any) -> None:
            hooks.queue_updated(self_)

        self.log.replace(comfy.server.PromptServer, "queue_updated", queue_updated)


WORKER_STATE_PATCHES: tuple[type[Patch], ...] = (
    ServerWorkerAttrs,
    ProgressRegistryPerWorker,
    ProgressStateToSubmitter,
    SeededGeneratorPerCall,
    InterruptPerWorker,
    LoadedModelsPerWorker,
    EmptyCachePerDevice,
)
SERVER_PATCHES: tuple[type[_HookedPatch], ...] = (DeviceWorkers, ServerSetup, EntryPorts, ScopedQueueStatus)


def all_patches(hooks: ServerHooks | None) -> list[Patch]:
    patches: list[Patch] = [cls() for cls in WORKER_STATE_PATCHES]
    if hooks is not None:
        patches += [cls(hooks) for cls in SERVER_PATCHES]
    return patches
