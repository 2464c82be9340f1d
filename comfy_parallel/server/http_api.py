"""Routes comfy-parallel adds to ComfyUI's server, and the device-aware versions of stock routes.

Added: ``GET /debug/queues`` (the seed's format), ``GET /multigpu/status``, the status page for people at
``GET /multigpu/`` (``status_page.html``, which polls ``status`` relative to itself) and ``GET /multigpu/unbind``
(ends the browser binding that opening ``/gpuN/`` made). Replaced in multi-device mode:
``POST /interrupt`` (stock interrupts "the" worker; here a prompt id stops only the worker running it, a target
stops that device, no target stops every device). Everything else stays ComfyUI's own handler and becomes
device-aware through the queues.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from ..scheduling import worker_context
from . import device_status, routing, validation
from .routing import UNBIND_PATH, current_route, unbind_response

if TYPE_CHECKING:
    from .multigpu import MultiDeviceServer

log = logging.getLogger("comfy_parallel.http")

# Package data: pyproject's [tool.setuptools.package-data] must list it for non-editable installs.
STATUS_PAGE = Path(__file__).with_name("status_page.html")


def debug_queues(server: "MultiDeviceServer") -> dict:
    return {"queues": [{"gpu_id": s.gpu_id, "queued": s.queued, "running": s.running}
                       for s in server.queues.stats()]}


def status(server: "MultiDeviceServer") -> dict:
    devices = []
    tracker: device_status.DeviceStatus | None = getattr(server, "device_status", None)
    pool = server.queues.pool_stats()
    for spec, stats in zip(server.settings.devices, server.queues.stats()):
        worker = server.workers[spec.index] if spec.index < len(server.workers) else None
        running_ids = server.queues.devices[spec.index].running_prompt_ids()
        devices.append({
            "gpu_id": spec.index,
            "device": spec.label,
            "name": device_status.device_name(spec),
            **device_status.vram(spec),
            "queued": stats.queued,
            "running": stats.running,
            "running_prompt_ids": running_ids,
            "progress": tracker.progress(spec.index, running_ids) if tracker is not None else None,
            "alive": bool(worker is not None and worker.is_alive()),
            "restarts": worker.restarts if worker is not None else 0,
            "loaded_models": server.loaded_models(spec.index),
            "models": device_status.loaded_models(spec.index),
            **device_status.model_loads(spec.index),
            "pool_picks": pool["devices"][spec.index] if pool is not None else None,
            "last_errors": tracker.last_errors(spec.index) if tracker is not None else [],
        })
    return {
        "mode": "multi-device",
        "default_route": server.settings.default_route,
        "pool": ({"enabled": True, **{k: v for k, v in pool.items() if k != "devices"}} if pool is not None
                 else {"enabled": False}),
        "entry_ports": {str(port): index for port, index in server.port_map.items()},
        "devices": devices,
        "weights": _weights_status(server),
        "cuda_graphs": _graph_status(server),
        "switch_interval_ms": round(sys.getswitchinterval() * 1000, 3),
    }


def _graph_status(server: "MultiDeviceServer") -> dict:
    if not server.settings.graphs_enabled:
        return {"enabled": False}
    from ..comfy_adapter.cuda_graphs import STATS

    return {"enabled": STATS.off_reason is None, **STATS.as_dict()}


def _weights_status(server: "MultiDeviceServer") -> dict:
    from ..weights import store as weights  # imports torch: only once ComfyUI has

    return weights.status(getattr(server, "weight_store", None), worker_context.loaded_models)


async def add_queue_devices(server: "MultiDeviceServer", response: web.StreamResponse) -> web.StreamResponse:
    """GET /queue plus ``gpu_ids``: each listed prompt's device, ``null`` while it waits in the pool."""
    if not isinstance(response, web.Response) or response.status != 200 or response.body is None:
        return response
    try:
        body = json.loads(response.body)  # type: ignore[arg-type]
        items = [*body.get("queue_running", []), *body.get("queue_pending", [])]
        ids = [str(item[1]) for item in items if isinstance(item, list) and len(item) > 1]
    except (TypeError, ValueError, AttributeError):
        return response
    return await routing.add_json_field(response, gpu_ids={pid: server.queues.device_of(pid) for pid in ids})


async def interrupt(server: "MultiDeviceServer", request: web.Request) -> web.Response:
    """POST /interrupt, device-aware. Same body and answer as ComfyUI's (``{"prompt_id": ...}`` optional)."""
    prompt_id = None
    raw = await request.read()  # cached by aiohttp: the validation step may have read it already
    if raw.strip():
        try:
            body = await validation.read_json(request)  # decoded as the validation step did: same verdict
        except validation.Invalid as err:
            error = {"type": err.kind, "message": f"POST /interrupt: {err.message}"}
            return web.json_response({"error": error}, status=400)
        if isinstance(body, dict):
            prompt_id = body.get("prompt_id")
    route = current_route()
    target = route.target if route is not None else None
    if prompt_id is not None:
        index = server.queues.device_running(str(prompt_id))
        if index is None or (target is not None and index != target):
            log.info("interrupt: prompt %s is not running%s; nothing to stop", prompt_id,
                     "" if target is None else f" on device {target}")
            return web.Response(status=200)
        indices = [index]
    elif target is not None:
        indices = [target]
    else:
        indices = [spec.index for spec in server.settings.devices]
    for index in indices:
        ctx = worker_context.get(index)
        if ctx is not None:
            ctx.set_interrupt(True)
    log.info("interrupt: device(s) %s", ", ".join(map(str, indices)))
    return web.Response(status=200)


def add_routes(server: "MultiDeviceServer", routes: web.RouteTableDef) -> None:
    """Add our GET routes to ComfyUI's route table (ComfyUI mirrors them under /api)."""

    @routes.get("/debug/queues")
    async def get_debug_queues(request: web.Request) -> web.Response:
        return web.json_response(debug_queues(server))

    @routes.get("/multigpu/status")
    async def get_status(request: web.Request) -> web.Response:
        return web.json_response(status(server), headers={"Cache-Control": "no-store"})

    @routes.get("/multigpu/")
    async def get_status_page(request: web.Request) -> web.Response:
        return web.Response(body=STATUS_PAGE.read_bytes(), content_type="text/html", charset="utf-8",
                            headers={"Cache-Control": "no-cache"})

    @routes.get("/multigpu")
    async def get_status_page_slash(request: web.Request) -> web.Response:
        # Relative, so it keeps whatever prefix the client used (/gpu1/, /api/, a reverse proxy's path).
        raise web.HTTPFound(location="multigpu/")

    @routes.get(UNBIND_PATH)
    async def get_unbind(request: web.Request) -> web.Response:
        return unbind_response(request.path)

    @routes.get("/metrics")
    async def get_metrics(request: web.Request) -> web.Response:
        return web.Response(body=server.metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    @routes.get("/health")
    async def get_health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    @routes.get("/ready")
    async def get_ready(request: web.Request) -> web.Response:
        ready = server.ready()
        workers = [{"gpu_id": w.spec.index, "alive": w.is_alive(), "started": w.ready.is_set()}
                   for w in server.workers]
        draining = bool(getattr(getattr(server, "graceful", None), "draining", False))
        recovering = bool(getattr(server, "recovering", False))
        return web.json_response({"ready": ready, "status": server.state(), "draining": draining,
                                  "recovering": recovering, "workers": workers}, status=200 if ready else 503)


def stock_path(request: web.Request) -> str | None:
    """The route ``request`` resolved to, without ``/api`` (and without any /gpuN prefix, which never resolves)."""
    resource = getattr(request.match_info.route, "resource", None)
    canonical = getattr(resource, "canonical", None)
    if canonical is None:
        return None
    return canonical[len("/api"):] if canonical.startswith("/api/") else canonical


def is_route(request: web.Request, method: str, path: str) -> bool:
    """True when ``request`` resolved to ComfyUI's ``path`` (or ``/api`` + path), under any device prefix."""
    return request.method == method and stock_path(request) == path

