"""Optional admin token for the routes that act on the whole server or reveal what other users run.

Stock ComfyUI has no access control, and with ``--admin-token`` unset neither has comfy-parallel. With a token,
``POST /free``, an untargeted ``POST /interrupt`` without a prompt id (it stops every device), ``POST /queue`` with
``clear`` (it empties queues other users filled), and the monitoring routes (``/metrics``, ``/multigpu/status``,
the ``/multigpu/`` page, ``/debug/queues``) need ``Authorization: Bearer TOKEN`` or ``X-Admin-Token: TOKEN``.
HTTP Basic with the token as password (any user name) is accepted too, so a browser can open the status page:
its 401 offers a Basic challenge besides the Bearer one. ``/health`` and ``/ready`` stay open for probes.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging

from aiohttp import web

from .routing import RequestRoute

log = logging.getLogger("comfy_parallel.access")

REALM = "comfy-parallel"
ADMIN_HEADER = "X-Admin-Token"
ALWAYS = {("POST", "/free"), ("GET", "/metrics"), ("GET", "/multigpu/status"), ("GET", "/multigpu/"),
          ("GET", "/debug/queues")}


def presented_token(request: web.BaseRequest) -> str | None:
    """The token in ``X-Admin-Token``, ``Authorization: Bearer`` or ``Authorization: Basic`` (as password)."""
    header = request.headers.get(ADMIN_HEADER)
    if header is not None:
        return header.strip()
    scheme, _, value = request.headers.get("Authorization", "").strip().partition(" ")
    if scheme.lower() == "bearer":
        return value.strip()
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
        return decoded.partition(":")[2]
    return None


async def _json_body(request: web.Request) -> dict:
    try:
        body = json.loads(await request.read() or b"{}")  # aiohttp caches the body for the handler
    except (ValueError, UnicodeDecodeError):
        return {}
    return body if isinstance(body, dict) else {}


async def needs_token(request: web.Request, path: str, route: RequestRoute) -> bool:
    """``path`` is the stock route (no /api or /gpuN prefix) the request resolved to."""
    if (request.method, path) in ALWAYS:
        return True
    if request.method == "POST" and path == "/interrupt":
        return route.target is None and (await _json_body(request)).get("prompt_id") is None
    if request.method == "POST" and path == "/queue":
        return bool((await _json_body(request)).get("clear"))
    return False


class AdminToken:
    def __init__(self, token: str) -> None:
        self._token = token.encode("utf-8")

    async def check(self, request: web.Request, path: str | None, route: RequestRoute) -> web.Response | None:
        """``None`` when the request may go on; a 401 otherwise."""
        if path is None or not await needs_token(request, path, route):
            return None
        given = presented_token(request)
        if given is not None and hmac.compare_digest(given.encode("utf-8"), self._token):
            return None
        peer = request.remote or "unknown peer"
        log.warning("comfy-parallel: 401 for %s %s from %s (%s)", request.method, request.path, peer,
                    "no token" if given is None else "wrong token")
        response = web.json_response(
            {"error": {"type": "unauthorized",
                       "message": f"{request.method} {path} needs the admin token: send 'Authorization: Bearer "
                                  f"<token>' or '{ADMIN_HEADER}: <token>'"}},
            status=401)
        response.headers.add("WWW-Authenticate", f'Bearer realm="{REALM}"')
        response.headers.add("WWW-Authenticate", f'Basic realm="{REALM}", charset="UTF-8"')
        return response
