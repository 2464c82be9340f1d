"""Patches of ComfyUI's server and main loop (``server.PromptServer``, ``main.prompt_worker``): the entry points
where the multi-device server takes over (workers, routes, listeners, queue status, websocket sends), and the
server attributes each worker must own."""

from __future__ import annotations

import asyncio
import logging
import os
import time
import weakref
from collections import deque
from typing import Any, Callable, Iterable, Protocol

from ..scheduling import worker_context
from .base import (CHECKED, Comfy, Patch, does_not_use, first_problem, require_callables, require_parameters,
                   require_signature, uses)

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


def stock_prompt_worker(comfy: Comfy) -> Any:
    """ComfyUI's own ``prompt_worker`` (also once ``device-workers`` has replaced it)."""
    return getattr(comfy.main.prompt_worker, "__wrapped__", comfy.main.prompt_worker)


def queue_contract_gaps(comfy: Comfy) -> str | None:
    """Which methods of ComfyUI's ``PromptQueue`` the per-device queues that replace it do not offer.

    ComfyUI's routes call these on ``PromptServer.prompt_queue``; one missing (0.33 added ``interrupt_if_running``
    for the Jobs API) would answer a 500, or act on every device, at the first such request.
    """
    from ..scheduling.queues import DeviceQueue, DeviceQueues

    stock = getattr(comfy.execution, "PromptQueue", None)
    if stock is None:
        return "execution.PromptQueue is gone"
    # prompt_worker's own calls go to its device's queue; everything else to the merged one
    worker_side = ("get", "task_done")
    missing = sorted(name for name, value in vars(stock).items()
                     if callable(value) and not name.startswith("_") and not isinstance(value, type)
                     and not callable(getattr(DeviceQueue if name in worker_side else DeviceQueues, name, None)))
    return f"execution.PromptQueue has {', '.join(missing)}, which DeviceQueues lacks" if missing else None


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
            lambda: uses(comfy.server.PromptServer.__init__, "client_id", "last_node_id"),
            lambda: uses(stock_prompt_worker(comfy), "last_prompt_id"),
            # 0.38 stamps each prompt's workflow_metadata on the server object: one value for all workers again
            lambda: does_not_use(stock_prompt_worker(comfy), "main.prompt_worker", "workflow_metadata"),
        )

    def _apply(self, comfy: Comfy) -> None:
        for attr in self.ATTRS:
            self.log.replace(comfy.server.PromptServer, attr, _PerWorkerAttr(attr))


class HookedPatch(Patch):
    def __init__(self, hooks: ServerHooks) -> None:
        super().__init__()
        self.hooks = hooks


class DeviceWorkers(HookedPatch):
    name = "device-workers"
    replaces = "main.prompt_worker"
    why = "start_comfyui starts one worker thread; it now starts one worker per device, each bound to its device"
    checked_on = CHECKED

    def check(self, comfy: Comfy) -> str | None:
        return first_problem(
            lambda: require_callables(comfy.main, "prompt_worker", "start_comfyui"),
            lambda: uses(comfy.main.start_comfyui, "prompt_worker"),
            # the replacement takes and passes on exactly these (0.38 adds asset_manager)
            lambda: require_signature(stock_prompt_worker(comfy), "main.prompt_worker", "q", "server_instance"),
        )

    def _apply(self, comfy: Comfy) -> None:
        original = comfy.main.prompt_worker
        hooks = self.hooks

        def prompt_worker(q: Any, server_instance: Any) -> None:
            hooks.start_workers(server_instance, original)

        prompt_worker.__wrapped__ = original  # type: ignore[attr-defined]
        self.log.replace(comfy.main, "prompt_worker", prompt_worker)


class ServerSetup(HookedPatch):
    name = "server-setup"
    replaces = "server.PromptServer.add_routes"
    why = ("install the per-device queues, the routing middleware, the /gpuN prefixes and the added routes "
           "while the app can still be changed")
    checked_on = CHECKED

    def check(self, comfy: Comfy) -> str | None:
        return first_problem(
            lambda: require_callables(comfy.server.PromptServer, "add_routes"),
            lambda: uses(comfy.server.PromptServer.__init__, "routes", "app", "prompt_queue"),
            lambda: uses(comfy.server.PromptServer.add_routes, "app", "routes"),
            lambda: queue_contract_gaps(comfy),
        )

    def _apply(self, comfy: Comfy) -> None:
        original = comfy.server.PromptServer.add_routes
        hooks = self.hooks

        def add_routes(self_: Any) -> None:
            hooks.before_routes(self_)
            original(self_)
            hooks.after_routes(self_)

        self.log.replace(comfy.server.PromptServer, "add_routes", add_routes)


class EntryPorts(HookedPatch):
    name = "entry-ports"
    replaces = "server.PromptServer.start_multi_address"
    why = "open one extra listener per device (entry ports 8181..) on the same app"
    checked_on = CHECKED

    def check(self, comfy: Comfy) -> str | None:
        return first_problem(
            lambda: require_callables(comfy.server.PromptServer, "start_multi_address"),
            lambda: require_parameters(comfy.server.PromptServer.start_multi_address,
                                       "PromptServer.start_multi_address", "self", "addresses"),
        )

    def _apply(self, comfy: Comfy) -> None:
        original = comfy.server.PromptServer.start_multi_address
        hooks = self.hooks

        async def start_multi_address(self_: Any, addresses: Iterable[tuple[str, int]], *args: Any,
                                      **kwargs: Any) -> Any:
            return await original(self_, hooks.listen_addresses(list(addresses)), *args, **kwargs)

        self.log.replace(comfy.server.PromptServer, "start_multi_address", start_multi_address)


class ScopedQueueStatus(HookedPatch):
    name = "scoped-queue-status"
    replaces = "server.PromptServer.queue_updated"
    why = "a websocket opened for one device gets that device's queue length; untargeted sockets get the total"
    checked_on = CHECKED

    def check(self, comfy: Comfy) -> str | None:
        return first_problem(
            lambda: require_callables(comfy.server.PromptServer, "queue_updated", "get_queue_info", "send_sync"),
            lambda: require_signature(comfy.server.PromptServer.queue_updated, "PromptServer.queue_updated", "self"),
        )

    def _apply(self, comfy: Comfy) -> None:
        hooks = self.hooks

        def queue_updated(self_: Any) -> None:
            hooks.queue_updated(self_)

        self.log.replace(comfy.server.PromptServer, "queue_updated", queue_updated)


class QuietRetriedAttempt(HookedPatch):
    name = "quiet-retried-attempt"
    replaces = "server.PromptServer.send_sync"
    why = ("a prompt's first out-of-memory error is retried on the freed device, but its submitter was already sent "
           "execution_error and the end of the prompt, and then saw it run again; a device worker's message goes out "
           "only if the server's hooks do not hold it back (history and metrics still record the OOM)")
    checked_on = CHECKED

    def check(self, comfy: Comfy) -> str | None:
        return first_problem(
            lambda: require_callables(comfy.server.PromptServer, "send_sync"),
            lambda: require_signature(comfy.server.PromptServer.send_sync, "PromptServer.send_sync", "self", "event",
                                      "data", "sid"),
            lambda: require_callables(comfy.execution.PromptExecutor, "add_message"),
            lambda: uses(comfy.execution.PromptExecutor.add_message, "send_sync"),
            lambda: uses(stock_prompt_worker(comfy), "send_sync", "task_done"),
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


class DeviceInExecutionStart(Patch):
    name = "device-in-execution-start"
    replaces = "execution.PromptExecutor.add_message"
    why = ("a pooled prompt (--default-route pool) gets its device only when a worker takes it; its execution_start "
           "message (to the client and in history's status messages) now names that device as gpu_id")
    checked_on = CHECKED

    def check(self, comfy: Comfy) -> str | None:
        return first_problem(
            lambda: require_callables(comfy.execution.PromptExecutor, "add_message"),
            lambda: require_signature(comfy.execution.PromptExecutor.add_message, "PromptExecutor.add_message", "self",
                                      "event", "data", "broadcast"),
        )

    def _apply(self, comfy: Comfy) -> None:
        original = comfy.execution.PromptExecutor.add_message

        def add_message(self_: Any, event: str, data: dict, broadcast: bool) -> Any:
            ctx = worker_context.current()
            if ctx is not None and event == "execution_start" and isinstance(data, dict):
                data = {**data, "gpu_id": ctx.index}
            return original(self_, event, data, broadcast)

        add_message.__wrapped__ = original  # type: ignore[attr-defined]
        self.log.replace(comfy.execution.PromptExecutor, "add_message", add_message)


class _Outbox:
    """One websocket's unsent messages (send function, message, time queued), sent in order by one task."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.items: deque[tuple[Callable[[Any], Any], Any, float]] = deque()
        self.task: asyncio.Task | None = None  # held here: the loop keeps only a weak reference to tasks
        self.sending_since: float | None = None  # when the message being sent was queued


class WebsocketSendPerClient(HookedPatch):
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
            lambda: require_signature(server.send_socket_catch_exception, "server.send_socket_catch_exception",
                                      "function", "message"),
            lambda: require_callables(server.PromptServer, "publish_loop", "send_json", "send_bytes"),
            lambda: uses(server.PromptServer.send_json, "send_socket_catch_exception"),
            lambda: uses(server.PromptServer.send_bytes, "send_socket_catch_exception"),
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
