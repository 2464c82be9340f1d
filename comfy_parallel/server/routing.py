"""Decide which device an HTTP request targets: ``X-TARGET-GPU`` header, entry port, ``/gpuN/`` prefix or cookie.

Every request passes through :func:`make_middleware`. It resolves the target once, rejects bad targets with a
JSON 400 that names the valid ones, and stores the decision in a context variable that the queues and the
adapter read while the request is handled (including the whole life of a websocket).

The web UI cannot run under ``/gpuN/``: the frontend's router matches absolute paths (``/``), so under a prefix
it renders nothing after its first API call. Opening ``/gpuN/`` in a browser therefore binds the browser to
device N with a cookie and sends it to ``/``; every later request that carries the cookie (the UI, ``/api/...``,
``/ws``) targets N unless it names a target explicitly. ``/multigpu/unbind`` clears the cookie.

Path prefixes are served by :class:`DevicePrefixResource`, an aiohttp resource registered for ``/gpuN`` that
resolves the rest of the path against the app's own router, so every route (``/ws``, ``/api/...``, the web UI,
routes that custom nodes add) works under the prefix without being registered twice.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import re
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from aiohttp import web
from aiohttp.web_urldispatcher import AbstractResource, UrlMappingMatchInfo
from yarl import URL

HEADER = "X-TARGET-GPU"
COOKIE = "comfy_parallel_gpu"
UNBIND_PATH = "/multigpu/unbind"
_MAX_LOGGED_COOKIES = 64
log = logging.getLogger("comfy_parallel.routing")
_PREFIX_LIKE_RE = re.compile(r"^/gpu([^/]*)(/.*)?$")


class RoutingError(Exception):
    def __init__(self, message: str, valid: list[int]) -> None:
        super().__init__(message)
        self.message = message
        self.valid = valid

    def response(self) -> web.Response:
        body = {
            "error": {"type": "invalid_target", "message": self.message},
            "valid_targets": self.valid,
            "how": {"header": f"{HEADER}: <index>", "prefix": "/gpu<index>/...", "auto": f"omit {HEADER}"},
        }
        return web.json_response(body, status=400)


@dataclass
class RequestRoute:
    """The routing decision for one request; ``assigned`` is set when a prompt is queued on a device, ``pooled``
    when it waits in the pool instead (``--default-route pool``), ``stored`` when it goes to the write-ahead queue
    (done once it is on disk and queued or pooled)."""

    target: int | None
    source: str  # "header", "port", "prefix", "cookie" or "none"; agreeing explicit ones joined with "+"
    assigned: int | None = None
    pooled: bool = False
    stored: Future | asyncio.Future | None = None


_current: contextvars.ContextVar[RequestRoute | None] = contextvars.ContextVar("comfy_parallel_route",
                                                                               default=None)


def current_route() -> RequestRoute | None:
    return _current.get()


def use_route(route: RequestRoute | None) -> contextvars.Token:
    return _current.set(route)


def reset_route(token: contextvars.Token) -> None:
    _current.reset(token)


def parse_index(text: str, n_devices: int, what: str) -> int:
    """An index in ASCII digits: ``\\d`` and ``int`` also take other scripts' digits (``"\\u0661"`` is 1 to them)."""
    valid = list(range(n_devices))
    stripped = text.strip()
    if not re.fullmatch(r"-?[0-9]+", stripped):
        raise RoutingError(f"{what} {text!r} is not a device index; valid targets are {valid}", valid)
    index = int(stripped)
    if not 0 <= index < n_devices:
        raise RoutingError(f"{what} {index} is out of range; valid targets are {valid}", valid)
    return index


def prefix_of(path: str) -> tuple[str, str] | None:
    """Split ``/gpu1/api/prompt`` into (``1``, ``/api/prompt``); ``None`` if the path has no device prefix."""
    m = _PREFIX_LIKE_RE.match(path)
    if m is None:
        return None
    return m.group(1), m.group(2) or "/"


def is_device_prefix(rest: str) -> bool:
    """``/gpu1``, ``/gpu-1``, ``/gpu``, ``/gpu1.5`` are device prefixes (valid or not); ``/gpu_stats`` is not."""
    return rest == "" or not (rest[0].isalpha() or rest[0] == "_")


def parse_prefix(text: str, rest: str, n_devices: int) -> int:
    """The index of ``/gpu<text><rest>``, spelled exactly as a registered prefix and not nested.

    ``/gpu01``, ``/gpu-0`` or ``/gpu%201`` parse to a valid index, but no ``/gpuN`` resource matches them (a 404
    after the target was accepted); ``/gpu1/gpu2/...`` would run on device 1 with device 2 in the path.
    """
    index = parse_index(text, n_devices, "path prefix /gpu<N>")
    valid = list(range(n_devices))
    if text != str(index):
        raise RoutingError(f"path prefix {'/gpu' + text!r} is not a device index; use /gpu{index}/", valid)
    nested = prefix_of(rest)
    if nested is not None and is_device_prefix(nested[0]):
        raise RoutingError(f"nested device prefixes {'/gpu' + text + '/gpu' + nested[0]!r}; give one", valid)
    return index


def header_values(headers: Any) -> list[str]:
    """Every ``X-TARGET-GPU`` value: a repeated header naming two devices is a conflict, not its first value."""
    getall = getattr(headers, "getall", None)
    if getall is not None:
        return list(getall(HEADER, []))
    value = headers.get(HEADER)
    return [] if value is None else [value]


def resolve(headers: Any, path: str, local_port: int | None, n_devices: int,
            port_map: dict[int, int], cookie: int | None = None) -> RequestRoute:
    """Combine header, entry port and path prefix; they must agree when more than one is given.

    ``cookie`` (a browser's binding, already parsed) applies only when none of them names a target and no
    ``X-TARGET-GPU: auto`` asks for the default route: a cookie is sent to every port of the host, so an entry
    port or an explicit header that differs from it is the client's intent, not a conflict.
    """
    valid = list(range(n_devices))
    found: list[tuple[str, int]] = []
    if local_port is not None and local_port in port_map:
        found.append(("port", port_map[local_port]))
    prefix = prefix_of(path)
    if prefix is not None and is_device_prefix(prefix[0]):
        found.append(("prefix", parse_prefix(prefix[0], prefix[1], n_devices)))
    asked_auto = False
    for header_value in header_values(headers):
        if header_value.strip().lower() == "auto":
            asked_auto = True
        else:
            found.append(("header", parse_index(header_value, n_devices, f"{HEADER} header")))
    if not found:
        if cookie is not None and not asked_auto:
            return RequestRoute(cookie, "cookie")
        return RequestRoute(None, "none")
    if len({index for _, index in found}) > 1:
        parts = ", ".join(f"{source}={index}" for source, index in found)
        raise RoutingError(f"conflicting targets ({parts}); give one target or matching ones", valid)
    source, index = found[0]
    return RequestRoute(index, "+".join(s for s, _ in found) if len(found) > 1 else source)


def local_port_of(request: web.BaseRequest) -> int | None:
    transport = request.transport
    if transport is None:
        return None
    sockname = transport.get_extra_info("sockname")
    if isinstance(sockname, (tuple, list)) and len(sockname) >= 2:
        return int(sockname[1])
    return None


def is_ui_entry(path: str) -> int | None:
    """The device N of ``/gpuN/`` or ``/gpuN/index.html`` (the web UI's page), else ``None``."""
    m = re.fullmatch(r"/gpu([0-9]+)/(index\.html)?", path)
    return int(m.group(1)) if m is not None and m.group(1) == str(int(m.group(1))) else None


def to_root(path: str) -> str:
    """A relative URL from ``path`` to the server's root: keeps whatever path a reverse proxy mounted us under."""
    depth = path.count("/") - 1
    return "../" * depth if depth > 0 else "./"


def bind_response(index: int, path: str) -> web.Response:
    """303 to the UI at the root, with the cookie that binds this browser to device ``index``."""
    response = web.Response(status=303, headers={"Location": to_root(path), "Cache-Control": "no-store"})
    response.set_cookie(COOKIE, str(index), path="/", httponly=True, samesite="Lax")
    return response


def unbind_response(path: str) -> web.Response:
    """303 to the UI at the root, clearing the binding: the browser's requests are untargeted again."""
    response = web.Response(status=303, headers={"Location": to_root(path), "Cache-Control": "no-store"})
    response.del_cookie(COOKIE, path="/")
    return response


class CookieReader:
    """Parse the binding cookie; a bad one (not an index, or out of range after a restart with fewer devices)
    is ignored and cleared, and logged once per value so that a client that keeps sending it cannot flood
    the log."""

    def __init__(self, n_devices: int) -> None:
        self.n_devices = n_devices
        self._logged: set[str] = set()

    def read(self, request: web.BaseRequest) -> tuple[int | None, bool]:
        """(device index or ``None``, whether the request carried a bad cookie to clear)."""
        value = request.cookies.get(COOKIE)
        if value is None:
            return None, False
        try:
            return parse_index(value, self.n_devices, f"cookie {COOKIE}"), False
        except RoutingError as err:
            if value not in self._logged and len(self._logged) < _MAX_LOGGED_COOKIES:
                self._logged.add(value)
                log.info("comfy-parallel: ignoring and clearing a stale binding: %s", err.message)
            return None, True


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def make_middleware(n_devices: int, port_map: dict[int, int],
                    on_route: Callable[[web.Request, RequestRoute, Handler], Awaitable[web.StreamResponse]],
                    on_client_left: Callable[[], None] = lambda: None) -> Callable:
    """The outermost middleware: resolve the target, then let ``on_route`` run the request under it.

    ``on_client_left`` is called for each request whose client closed the connection before it was answered.
    """
    cookies = CookieReader(n_devices)

    @web.middleware
    async def comfy_parallel_routing(request: web.Request, handler: Handler) -> web.StreamResponse:
        cookie, stale_cookie = cookies.read(request)
        try:
            route = resolve(request.headers, request.path, local_port_of(request), n_devices, port_map, cookie)
        except RoutingError as err:
            return err.response()
        prefix = prefix_of(request.path)
        if prefix is not None and is_device_prefix(prefix[0]) and request.path == f"/gpu{prefix[0]}":
            raise web.HTTPMovedPermanently(location=str(request.rel_url.with_path(request.path + "/")))
        ui_device = is_ui_entry(request.path)
        if ui_device is not None and request.method in ("GET", "HEAD"):
            return bind_response(ui_device, request.path)
        token = use_route(route)
        try:
            response = await on_route(request, route, handler)
            if stale_cookie and not response.prepared:
                response.del_cookie(COOKIE, path="/")
            return response
        except ConnectionResetError:
            if request.transport is not None and not request.transport.is_closing():
                raise
            # The client left while its request was read; aiohttp would log a traceback and a 500 nobody gets.
            log.info("client %s left during %s %s before it was answered", request.remote, request.method,
                     request.path)
            on_client_left()
            return web.json_response({"error": {"type": "client_disconnected",
                                                "message": "the client closed the connection"}}, status=400)
        finally:
            reset_route(token)

    return comfy_parallel_routing


class DevicePrefixResource(AbstractResource):
    """``/gpuN/<rest>``: resolves ``<rest>`` with the app's router, so every route exists under the prefix."""

    def __init__(self, index: int, router: web.UrlDispatcher) -> None:
        super().__init__(name=None)
        self._index = index
        self._prefix = f"/gpu{index}"
        self._router = router

    @property
    def canonical(self) -> str:
        return self._prefix

    def url_for(self, **kwargs: str) -> URL:
        return URL.build(path=self._prefix + "/")

    async def resolve(self, request: web.Request) -> tuple[UrlMappingMatchInfo | None, set[str]]:
        path = request.rel_url.path
        if path != self._prefix and not path.startswith(self._prefix + "/"):
            return None, set()
        rest = path[len(self._prefix):] or "/"
        inner = request.clone(rel_url=request.rel_url.with_path(rest))
        match = await self._router.resolve(inner)
        exc = match.http_exception
        if exc is not None:
            allowed = getattr(exc, "allowed_methods", None) or set()
            return None, set(allowed)
        return match, set()

    def add_prefix(self, prefix: str) -> None:
        raise RuntimeError("device prefixes cannot be nested in a sub-application")

    def get_info(self) -> dict[str, Any]:
        return {"prefix": self._prefix, "device": self._index}

    def raw_match(self, path: str) -> bool:
        return path == self._prefix

    def __len__(self) -> int:
        return 0

    def __iter__(self):  # type: ignore[override]
        return iter(())


def register_prefixes(app: web.Application, n_devices: int) -> None:
    for index in range(n_devices):
        app.router.register_resource(DevicePrefixResource(index, app.router))


async def add_json_field(response: web.StreamResponse, **fields: Any) -> web.StreamResponse:
    """Return ``response`` with ``fields`` added to its JSON object body (used for ``gpu_id`` on /prompt)."""
    if not isinstance(response, web.Response) or response.content_type != "application/json":
        return response
    try:
        body = json.loads(response.body)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return response
    if not isinstance(body, dict):
        return response
    body.update(fields)
    new = web.json_response(body, status=response.status)
    for key, value in response.headers.items():
        if key.lower() not in ("content-length", "content-type"):
            new.headers[key] = value
    return new
