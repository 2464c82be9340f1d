"""Routes comfy-parallel adds to ComfyUI's server, and the device-aware versions of stock routes.

Added: ``GET /debug/queues`` (the seed's format) and ``GET /multigpu/status``. Replaced in multi-device mode:
``POST /interrupt`` (stock interrupts "the" worker; here a prompt id stops only the worker running it, a target
stops that device, no target stops every device). Everything else stays ComfyUI's own handler and becomes
device-aware through the queues.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING

from aiohttp import web

from . import worker_context
from .routing import current_route

if TYPE_CHECKING:
    from .multigpu import MultiDeviceServer

log = logging.getLogger("comfy_parallel.http")


def debug_queues(server: "MultiDeviceServer") -> dict:
    return {"queues": [{"gpu_id": s.gpu_id, "queued": s.queued, "running": s.running}
                       for s in server.queues.stats()]}


def status(server: "MultiDeviceServer") -> dict:
    devices = []
    for spec, stats in zip(server.settings.devices, server.queues.stats()):
        ctx = worker_context.get(spec.index)
        worker = server.workers[spec.index] if spec.index < len(server.workers) else None
        devices.append({
            "gpu_id": spec.index,
            "device": spec.label,
            "queued": stats.queued,
            "running": stats.running,
            "running_prompt_ids": server.queues.devices[spec.index].running_prompt_ids(),
            "alive": bool(worker is not None and worker.is_alive()),
            "restarts": worker.restarts if worker is not None else 0,
            "loaded_models": len(ctx.loaded_models) if ctx is not None else 0,
        })
    return {
        "mode": "multi-device",
        "default_route": server.settings.default_route,
        "entry_ports": {str(port): index for port, index in server.port_map.items()},
        "devices": devices,
    }


async def interrupt(server: "MultiDeviceServer", request: web.Request) -> web.Response:
    """POST /interrupt, device-aware. Same body and answer as ComfyUI's (``{"prompt_id": ...}`` optional)."""
    prompt_id = None
    if request.can_read_body:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return web.json_response({"error": {"type": "invalid_json", "message": "body is not JSON"}},
                                     status=400)
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
        return web.json_response(status(server))


def is_route(request: web.Request, method: str, path: str) -> bool:
    """True when ``request`` resolved to ComfyUI's ``path`` (or ``/api`` + path), under any device prefix."""
    if request.method != method:
        return False
    resource = getattr(request.match_info.route, "resource", None)
    canonical = getattr(resource, "canonical", None)
    return canonical in (path, "/api" + path)

