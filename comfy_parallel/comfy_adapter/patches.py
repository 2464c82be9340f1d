"""Every change comfy-parallel makes to ComfyUI, one class each.

Each patch fixes one row of DESIGN.md section 3 (process-global state that breaks with N concurrent workers) or
opens one entry point (worker start, routes, listeners). All were checked against ComfyUI 0.3.52 and 0.3.75.
The worker-state patches fall back to ComfyUI's own globals on threads that are not device workers, so code on
the event loop thread behaves as in stock ComfyUI.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import MutableSequence
from typing import Any, Callable, Iterable, Protocol

from .. import worker_context
from .base import Comfy, Patch, first_problem, require_callables, require_modules

CHECKED = ("0.3.52", "0.3.75")
log = logging.getLogger("comfy_parallel.adapter")


class ServerHooks(Protocol):
    """What the multi-device server provides at ComfyUI's entry points (see comfy_parallel.server)."""

    def before_routes(self, prompt_server: Any) -> None: ...

    def after_routes(self, prompt_server: Any) -> None: ...

    def start_workers(self, prompt_server: Any, prompt_worker: Callable[[Any, Any], None]) -> None: ...

    def listen_addresses(self, addresses: list[tuple[str, int]]) -> list[tuple[str, int]]: ...

    def queue_updated(self, prompt_server: Any) -> None: ...

    def websocket_dropped(self, reason: str) -> None: ...

    def quiet_worker_message(self, event: str, data: Any) -> bool: ...


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
        return require_modules("comfy.sample") or _uses(sys.modules["comfy.sample"].prepare_noise, "manual_seed")

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


class UniqueSaveCounters(Patch):
    name = "unique-save-counters"
    replaces = ("folder_paths.get_save_image_path; nodes.SaveImage.save_images and, where it exists (0.3.75), "
                "comfy_api.latest._ui.ImageSaveHelper.save_images, to learn how many files a call writes")
    why = ("the next file number comes from listing the output folder, so two workers saving under one prefix at "
           "once got the same number and one image overwrote the other (2xH200: /view served another prompt's or "
           "a half-written PNG). Numbers are now handed out under a lock and a number stays taken once handed "
           "out, for as many files as the saving node writes (one where that is not known)")
    checked_on = CHECKED

    def check(self, comfy: Comfy) -> str | None:
        save_image = getattr(comfy.nodes, "SaveImage", None)
        if save_image is None:
            return "nodes.SaveImage is missing"
        return (require_modules("folder_paths") or require_callables(sys.modules["folder_paths"], "get_save_image_path")
                or require_callables(save_image, "save_images"))

    def _apply(self, comfy: Comfy) -> None:
        fp = sys.modules["folder_paths"]
        original = fp.get_save_image_path
        lock = threading.Lock()
        next_free: dict[tuple[str, str], int] = {}
        files_per_call = threading.local()

        def get_save_image_path(filename_prefix: str, output_dir: str, image_width: int = 0,
                                image_height: int = 0) -> tuple[str, str, int, str, str]:
            with lock:
                folder, filename, counter, subfolder, prefix = original(filename_prefix, output_dir, image_width,
                                                                        image_height)
                key = (os.path.normcase(os.path.abspath(folder)), os.path.normcase(filename))
                counter = max(counter, next_free.get(key, counter))
                next_free[key] = counter + max(1, getattr(files_per_call, "n", 1))
            return folder, filename, counter, subfolder, prefix

        def announcing(save: Callable, images_at: int) -> Callable:
            def save_images(*args: Any, **kwargs: Any) -> Any:
                images = kwargs.get("images", args[images_at] if len(args) > images_at else None)
                files_per_call.n = len(images) if images is not None else 1
                try:
                    return save(*args, **kwargs)
                finally:
                    files_per_call.n = 1
            save_images.__wrapped__ = save  # type: ignore[attr-defined]
            return save_images

        get_save_image_path.__wrapped__ = original  # type: ignore[attr-defined]
        self.log.replace_everywhere(fp, "get_save_image_path", get_save_image_path)
        save_image = comfy.nodes.SaveImage
        self.log.replace(save_image, "save_images", announcing(save_image.save_images, 1))
        helper = getattr(sys.modules.get("comfy_api.latest._ui"), "ImageSaveHelper", None)
        if helper is not None and isinstance(helper.__dict__.get("save_images"), staticmethod):
            self.log.replace(helper, "save_images", staticmethod(announcing(helper.save_images, 0)))


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


class QuietRetriedAttempt(_HookedPatch):
    name = "quiet-retried-attempt"
    replaces = "server.PromptServer.send_sync"
    why = ("a prompt's first out-of-memory error is retried on the freed device, but its submitter was already sent "
           "execution_error and the end of the prompt, and then saw it run again; a device worker's message goes out "
           "only if the server's hooks do not hold it back (history and metrics still record the OOM)")
    checked_on = CHECKED

    def check(self, comfy: Comfy) -> str | None:
        return first_problem(
            lambda: require_callables(comfy.server.PromptServer, "send_sync"),
            lambda: require_callables(comfy.execution.PromptExecutor, "add_message"),
            lambda: _uses(comfy.execution.PromptExecutor.add_message, "send_sync"),
            lambda: _uses(getattr(comfy.main.prompt_worker, "__wrapped__", comfy.main.prompt_worker),
                          "send_sync", "task_done"),
        )

    def _apply(self, comfy: Comfy) -> None:
        original = comfy.server.PromptServer.send_sync
        hooks = self.hooks

        def send_sync(self_: Any, event: Any, data: Any, sid: Any = None) -> None:
            if worker_context.current() is not None and hooks.quiet_worker_message(event, data):
                return None
            return original(self_, event, data, sid)

        send_sync.__wrapped__ = original  # type: ignore[attr-defined]
        self.log.replace(comfy.server.PromptServer, "send_sync", send_sync)


class _Outbox:
    """One websocket's unsent messages (send function, message, time queued), sent in order by one task."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.items: deque[tuple[Callable[[Any], Any], Any, float]] = deque()
        self.task: asyncio.Task | None = None  # held here: the loop keeps only a weak reference to tasks
        self.sending_since: float | None = None  # when the message being sent was queued


class WebsocketSendPerClient(_HookedPatch):
    name = "websocket-send-per-client"
    replaces = "server.send_socket_catch_exception"
    why = ("PromptServer.publish_loop awaits every socket send in turn, so one client that stops reading stalled "
           "the messages of every client on every device; each socket now has its own ordered outbox and sender, "
           "and a client whose oldest unsent message waited longer than COMFY_PARALLEL_WS_MAX_LAG_S (default 10 s) "
           "is closed, logged and counted")
    checked_on = CHECKED
    ENV = "COMFY_PARALLEL_WS_MAX_LAG_S"
    DEFAULT_MAX_LAG_S = 10.0

    def check(self, comfy: Comfy) -> str | None:
        server = comfy.server
        return first_problem(
            lambda: require_callables(server, "send_socket_catch_exception"),
            lambda: require_callables(server.PromptServer, "publish_loop", "send_json", "send_bytes"),
            lambda: _uses(server.PromptServer.send_json, "send_socket_catch_exception"),
            lambda: _uses(server.PromptServer.send_bytes, "send_socket_catch_exception"),
        )

    @classmethod
    def max_lag_s(cls) -> float:
        raw = os.environ.get(cls.ENV, "")
        try:
            value = float(raw) if raw.strip() else cls.DEFAULT_MAX_LAG_S
        except ValueError:
            value = -1.0
        if not value > 0:
            log.warning("%s=%r is not a positive number of seconds; using %.0f", cls.ENV, raw, cls.DEFAULT_MAX_LAG_S)
            value = cls.DEFAULT_MAX_LAG_S
        return value

    def _apply(self, comfy: Comfy) -> None:
        from aiohttp import web

        server = comfy.server
        original = server.send_socket_catch_exception
        hooks = self.hooks
        max_lag = self.max_lag_s()
        outboxes: dict[Any, _Outbox] = {}
        dropped: weakref.WeakSet = weakref.WeakSet()
        closing: set[asyncio.Task] = set()
        # One timer checks every outbox (a timeout per message would cost a task per message).
        watchdog: list[asyncio.TimerHandle] = []

        def client_id_of(ws: Any) -> str | None:
            sockets = getattr(getattr(server.PromptServer, "instance", None), "sockets", {})
            return next((sid for sid, other in list(sockets.items()) if other is ws), None)

        async def close_quietly(ws: Any) -> None:
            try:
                await asyncio.wait_for(ws.close(code=1013, message=b"client too slow"), 1.0)
            except Exception:  # the connection is being given up; how it ends does not matter
                pass

        def drop(outbox: _Outbox, reason: str, waited: float) -> None:
            ws = outbox.ws
            outbox.items.clear()
            dropped.add(ws)
            if outboxes.get(ws) is outbox:
                del outboxes[ws]
            if outbox.task is not None and outbox.task is not asyncio.current_task():
                outbox.task.cancel()
            log.warning("websocket client %s cannot keep up (%s: a message waited %.1f s, limit %.1f s); closing it",
                        client_id_of(ws), reason, waited, max_lag)
            hooks.websocket_dropped(reason)
            # WARNING: aiohttp 3.9-3.14 keeps the request (and its transport) in WebSocketResponse._req. close()
            # would first flush the buffer this client does not read, so the transport is aborted instead.
            transport = getattr(getattr(ws, "_req", None), "transport", None)
            if transport is not None:
                transport.abort()
            else:
                task = asyncio.get_running_loop().create_task(close_quietly(ws))
                closing.add(task)
                task.add_done_callback(closing.discard)

        def check_lag() -> None:
            watchdog.clear()
            now = time.monotonic()
            for outbox in list(outboxes.values()):
                if outbox.sending_since is not None and now - outbox.sending_since > max_lag:
                    drop(outbox, "send_blocked", now - outbox.sending_since)
                elif outbox.items and now - outbox.items[0][2] > max_lag:
                    drop(outbox, "backlog", now - outbox.items[0][2])
            if outboxes:
                arm_watchdog()

        def arm_watchdog() -> None:
            if not watchdog:
                watchdog.append(asyncio.get_running_loop().call_later(min(1.0, max_lag / 4), check_lag))

        async def pump(outbox: _Outbox) -> None:
            try:
                while outbox.items:
                    function, message, queued_at = outbox.items.popleft()
                    outbox.sending_since = queued_at
                    try:
                        await original(function, message)
                    except Exception:  # stock's publish_loop would die here; one bad message must not
                        log.exception("websocket message to client %s could not be sent", client_id_of(outbox.ws))
                    outbox.sending_since = None
            finally:
                if outboxes.get(outbox.ws) is outbox:
                    del outboxes[outbox.ws]

        async def send_socket_catch_exception(function: Callable[[Any], Any], message: Any) -> None:
            ws = getattr(function, "__self__", None)
            if not isinstance(ws, web.WebSocketResponse):
                return await original(function, message)
            if ws in dropped:
                return None
            outbox = outboxes.get(ws)
            if outbox is None:
                outbox = outboxes[ws] = _Outbox(ws)
                outbox.task = asyncio.get_running_loop().create_task(pump(outbox))
                arm_watchdog()
            outbox.items.append((function, message, time.monotonic()))
            return None

        send_socket_catch_exception.__wrapped__ = original  # type: ignore[attr-defined]
        self.log.replace(server, "send_socket_catch_exception", send_socket_catch_exception)

WORKER_STATE_PATCHES: tuple[type[Patch], ...] = (
    ServerWorkerAttrs,
    ProgressRegistryPerWorker,
    ProgressStateToSubmitter,
    SeededGeneratorPerCall,
    InterruptPerWorker,
    LoadedModelsPerWorker,
    EmptyCachePerDevice,
    UniqueSaveCounters,
)
SERVER_PATCHES: tuple[type[_HookedPatch], ...] = (DeviceWorkers, ServerSetup, EntryPorts, ScopedQueueStatus,
                                                WebsocketSendPerClient, QuietRetriedAttempt)


def all_patches(hooks: ServerHooks | None) -> list[Patch]:
    patches: list[Patch] = [cls() for cls in WORKER_STATE_PATCHES]
    if hooks is not None:
        patches += [cls(hooks) for cls in SERVER_PATCHES]
    store = getattr(hooks, "weight_store", None)
    if store is not None:
        from .shared_weights import shared_weight_patches

        patches += shared_weight_patches(store)
    settings = getattr(hooks, "settings", None)
    if settings is not None and settings.graphs_enabled:
        from .cuda_graphs import CudaGraphs

        patches.append(CudaGraphs())
    return patches
