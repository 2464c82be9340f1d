"""The multi-device server: what happens at each of ComfyUI's entry points (the adapter calls these hooks).

A prompt's path, top to bottom:
  HTTP request -> ``routing`` middleware decides the target (header | entry port | /gpuN prefix | none)
  -> ComfyUI's own /prompt handler -> ``DeviceQueues.put`` (target; else the shortest queue, or the pool)
  -> that device's ``DeviceQueue`` (or the pool, until a worker takes it: pool.py)
  -> its ``DeviceWorker`` thread running ComfyUI's prompt_worker
  -> ComfyUI's PromptExecutor on that device -> ``DeviceQueue.task_done`` -> the shared history.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from aiohttp import web

from ..comfy_adapter import custom_node_dirs, garbage_collection
from ..comfy_adapter.model_files import find_model_file
from ..durability import recovery, shutdown
from ..durability.journal import Journal
from ..durability.journal_writer import JournalWriter
from ..ops import scan
from ..scheduling import cuda_fatal, worker_context
from ..scheduling.pool import Residency
from ..scheduling.queues import DeviceQueues
from ..scheduling.warmup import Warmup
from ..scheduling.workers import DeviceWorker, start_workers
from ..settings import Settings
from . import access, http_api, routing, validation
from .device_status import DeviceStatus
from .metrics import DeviceMetrics
from .routing import RequestRoute

if TYPE_CHECKING:
    from ..weights.store import WeightStore

log = logging.getLogger("comfy_parallel")


class MultiDeviceServer:
    """Implements ``comfy_adapter.patches.ServerHooks`` for one ComfyUI process serving several devices."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.port_map: dict[int, int] = {port: i for i, port in enumerate(settings.entry_ports)}
        self.weight_store: "WeightStore | None" = None
        self.queues = DeviceQueues(len(settings.devices), routing.current_route, settings.default_route,
                                   on_change=self._queue_changed, slack=settings.affinity_slack,
                                   residency=self._residency, find_model=find_model_file)
        self.metrics = DeviceMetrics(self.queues, self.loaded_models, (d.label for d in settings.devices))
        self.queues.add_listener(self.metrics)
        self.device_status = DeviceStatus(len(settings.devices))  # progress and last errors for /multigpu/status
        self.queues.add_listener(self.device_status)
        self.queues.add_listener(PromptLog())
        # torch is imported here, after ComfyUI set up its CUDA allocator options, never at our module import
        from ..weights.store import HeapTrimmer, WeightStore

        self.weight_store = (WeightStore(settings.weights_ram_limit, settings.pin_weights, settings.host_copy)
                             if settings.shared_weights else None)
        self.queues.add_listener(HeapTrimmer(self.weight_store))
        self.warmup = Warmup(self.queues, settings.warmup_checkpoint)
        self.queues.add_listener(self.warmup)
        self.workers: list[DeviceWorker] = []
        self.prompt_server: Any = None
        self.ws_targets: dict[str, int] = {}
        self.admin = access.AdminToken(settings.admin_token) if settings.admin_token else None
        self.graceful = shutdown.GracefulShutdown(self, None, settings.drain_timeout)  # journal: in before_routes
        self.journal: Journal | None = None
        self.journal_writer: JournalWriter | None = None
        self.recovering = settings.persist  # until the write-ahead queue's prompts are queued again
        self.retry_notifier: recovery.CrashRetryNotifier | None = None
        for q in self.queues.devices:
            q.on_fatal = cuda_fatal.exit_process

    @property
    def n_devices(self) -> int:
        return len(self.settings.devices)

    # -- ComfyUI entry points -----------------------------------------------------------------------------------
    def before_routes(self, prompt_server: Any) -> None:
        self.prompt_server = prompt_server
        self.metrics.websocket_clients = lambda: len(prompt_server.sockets)
        self.metrics.gc_stats = garbage_collection.stats
        if self.settings.graphs_enabled:
            from ..comfy_adapter.cuda_graphs import STATS  # ComfyUI (and torch) are imported by now

            self.metrics.graph_stats = STATS.as_dict
        prompt_server.prompt_queue = self.queues
        http_api.add_routes(self, prompt_server.routes)
        self._open_journal(prompt_server)

    def _open_journal(self, prompt_server: Any) -> None:
        """History back before the listener starts; new prompts numbered after every stored one."""
        path = self._journal_path()
        if not self.settings.persist:
            if path.exists():
                log.warning("comfy-parallel: persistence is off: prompts and history stored at %s are not "
                            "restored", path)
            return
        self.journal = recovery.open_journal(path, self.settings.journal_synchronous)
        self.queues.history_store.journal = self.journal
        staging = recovery.open_staging(self.journal, self.settings.journal_synchronous)
        self.journal_writer = JournalWriter(self.journal, getattr(prompt_server, "loop", None), staging)
        self.graceful.writer = self.journal_writer
        self.queues.writer = self.journal_writer
        self.graceful.journal = self.journal
        self.retry_notifier = recovery.CrashRetryNotifier(prompt_server)
        self.queues.add_listener(self.retry_notifier)
        recovery.load_history(self.queues, self.journal, prompt_server)

    def _journal_path(self) -> Path:
        return Path(self.settings.persist_path) if self.settings.persist_path else shutdown.default_persist_path()

    def after_routes(self, prompt_server: Any) -> None:
        app: web.Application = prompt_server.app
        app.middlewares.insert(0, routing.make_middleware(self.n_devices, self.port_map, self._handle,
                                                          self.metrics.on_client_left))
        routing.register_prefixes(app, self.n_devices)

    def start_workers(self, prompt_server: Any, prompt_worker: Callable[[Any, Any], None]) -> None:
        self._restore_and_arm_shutdown(prompt_server, prompt_worker)
        self.workers = start_workers(self.settings.devices, self.queues.devices, prompt_server, prompt_worker,
                                     self.metrics.on_restart)
        self.log_startup()
        self.warmup.start()
        dirs = [Path(d) for d in custom_node_dirs()]
        threading.Thread(target=scan.startup_report, args=(dirs, log), name="comfy-parallel-scan", daemon=True).start()

    def _restore_and_arm_shutdown(self, prompt_server: Any, prompt_worker: Callable[[Any, Any], None]) -> None:
        """Queue what the write-ahead queue holds before any worker starts; then take over SIGTERM/SIGINT."""
        try:
            if self.journal is not None and self.retry_notifier is not None:
                # WARNING: ComfyUI 0.3.75/0.33's prompt_worker reads item[5] (``sensitive``); 0.3.52's have 5 fields.
                code = getattr(prompt_worker, "__code__", None)
                item_length = 6 if code is not None and "sensitive" in code.co_varnames else 5
                recovery.requeue(self.queues, self.journal, prompt_server, item_length, self.retry_notifier)
        except Exception:  # the store stays as it is for the next start; this one serves new prompts
            log.exception("comfy-parallel: could not queue the stored prompts again")
        finally:
            self.recovering = False
        # This runs on the thread start_comfyui made for the worker; signal handlers belong to the loop's thread.
        prompt_server.loop.call_soon_threadsafe(self.graceful.install, prompt_server.loop)

    def listen_addresses(self, addresses: list[tuple[str, int]]) -> list[tuple[str, int]]:
        hosts = list(dict.fromkeys(host for host, _ in addresses))
        return addresses + [(host, port) for port in self.settings.entry_ports for host in hosts]

    def queue_updated(self, prompt_server: Any) -> None:
        """Send each websocket the queue length of the device it is bound to (the total if unbound)."""
        infos: dict[int | None, dict] = {}
        for sid in list(prompt_server.sockets):
            target = self.ws_targets.get(sid)
            if target not in infos:
                token = routing.use_route(RequestRoute(target, "socket"))
                try:
                    infos[target] = prompt_server.get_queue_info()
                finally:
                    routing.reset_route(token)
            prompt_server.send_sync("status", {"status": infos[target]}, sid)

    def websocket_dropped(self, reason: str) -> None:
        self.metrics.on_websocket_dropped(reason)

    def quiet_worker_message(self, event: str, data: Any) -> bool:
        ctx = worker_context.current()
        return ctx is not None and self.queues.devices[ctx.index].quiet_message(event, data)

    # -- per request --------------------------------------------------------------------------------------------
    async def _handle(self, request: web.Request, route: RequestRoute,
                      handler: routing.Handler) -> web.StreamResponse:
        path = http_api.stock_path(request)
        if self.admin is not None:
            denied = await self.admin.check(request, path, route)
            if denied is not None:
                return denied
        if self.graceful.draining and http_api.is_route(request, "POST", "/prompt"):
            return shutdown.rejection(self.graceful, request)
        if path is not None:
            rejected = await validation.check(request, path)
            if rejected is not None:
                return rejected
        if http_api.is_route(request, "POST", "/interrupt"):
            return await http_api.interrupt(self, request)
        if http_api.is_route(request, "GET", "/ws"):
            return await self._websocket(request, route, handler)
        response = await handler(request)
        if route.stored is not None:
            try:
                await asyncio.wrap_future(route.stored)  # the answer promises a prompt that survives a crash
            except Exception as err:
                return web.json_response({"error": {"type": "not_stored", "message": f"the prompt could not be "
                                                    f"written to the write-ahead queue: {err}", "details": "",
                                                    "extra_info": {}}, "node_errors": {}}, status=500)
        if http_api.is_route(request, "POST", "/prompt"):
            if route.pooled:
                response = await routing.add_json_field(response, gpu_id=None, route="pool")
            elif route.assigned is not None:
                response = await routing.add_json_field(response, gpu_id=route.assigned)
        elif http_api.is_route(request, "GET", "/queue"):
            response = await http_api.add_queue_devices(self, response)
        return response

    async def _websocket(self, request: web.Request, route: RequestRoute,
                         handler: routing.Handler) -> web.StreamResponse:
        if route.target is None:
            return await handler(request)
        # Name the socket ourselves (ComfyUI would pick a random id) so its status messages can be scoped.
        sid = request.query.get("clientId") or uuid.uuid4().hex
        if "clientId" not in request.query:
            request = request.clone(rel_url=request.rel_url.update_query(clientId=sid))
        self.ws_targets[sid] = route.target
        try:
            return await handler(request)
        finally:
            if self.ws_targets.get(sid) == route.target:
                self.ws_targets.pop(sid, None)

    def loaded_models(self, index: int) -> int:
        return len(worker_context.loaded_models(index))

    def _residency(self, index: int) -> Residency:
        """Which model files the weight store's views have loaded on worker ``index`` (for the pool)."""
        if self.weight_store is None:
            return Residency({}, frozenset())
        from ..weights.store import residency

        return Residency(*residency(self.weight_store, index, worker_context.loaded_models(index)))

    def ready(self) -> bool:
        """Every worker thread is alive, has warmed up its device, and the optional model warm-up is done."""
        workers_up = len(self.workers) == self.n_devices and all(w.is_alive() and w.ready.is_set()
                                                                 for w in self.workers)
        return workers_up and self.warmup.done and not self.graceful.draining and not self.recovering

    def state(self) -> str:
        """What /ready says: recovering, draining, starting or ready."""
        if self.recovering:
            return "recovering"
        if self.graceful.draining:
            return "draining"
        return "ready" if self.ready() else "starting"

    def _queue_changed(self, index: int | None) -> None:
        if self.prompt_server is not None:
            self.prompt_server.queue_updated()

    def log_startup(self) -> None:
        devices = ", ".join(f"[{s.index}] {s.label}" for s in self.settings.devices)
        log.info("comfy-parallel: multi-device mode with %d workers: %s", self.n_devices, devices)
        if self.settings.cpu_mode:
            log.info("comfy-parallel: no CUDA device in use; CPU workers stand in for GPUs")
        route = self.settings.default_route
        log.info("comfy-parallel: routing by %s header, /gpuN/ path prefix%s; untargeted requests go to %s",
                 routing.HEADER, ", entry ports" if self.port_map else "",
                 "the shortest queue" if route == "auto" else
                 f"the pool (an idle worker takes the one cheapest for it; affinity slack "
                 f"{self.settings.affinity_slack})" if route == "pool" else f"device {route}")
        if self.settings.worker_vram_limit is not None:
            log.info("comfy-parallel: each CUDA worker's model loading plans with at most %.2f GiB of VRAM "
                     "(--worker-vram-limit)", self.settings.worker_vram_limit / 2**30)
        for port, index in self.port_map.items():
            log.info("comfy-parallel: entry port %d -> device %d (%s)", port, index,
                     self.settings.devices[index].label)



class PromptLog:
    """One log line per prompt start and end, naming the device (ComfyUI's own lines do not)."""

    def on_start(self, index: int, prompt_id: str, waited_s: float) -> None:
        log.info("[GPU %d] prompt %s started after %.0f ms in queue", index, prompt_id, 1000 * waited_s)

    def on_done(self, index: int, prompt_id: str, status: dict | None, exec_s: float) -> None:
        log.info("[GPU %d] prompt %s finished: %s in %.2f s", index, prompt_id,
                 (status or {}).get("status_str", "error"), exec_s)

    def on_oom_retry(self, index: int) -> None:
        log.warning("[GPU %d] out of memory: device freed, the prompt runs once more", index)
