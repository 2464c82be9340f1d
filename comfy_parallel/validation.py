"""Reject malformed input to stock routes with a JSON 400 before ComfyUI's handler fails on it with a 500.

ComfyUI's handlers call ``await request.json()`` and ``int(query[...])`` unguarded, so a bad body or query
string surfaces as an HTTP 500 with a traceback in the log. In multi-device mode the routing middleware runs
these checks first; the handlers then see only input they can parse (aiohttp caches the body it read).
"""

from __future__ import annotations

import json

from aiohttp import web

JSON_OBJECT_ROUTES = ("/prompt", "/queue", "/interrupt", "/free", "/history")
INT_QUERY = {"/history": ("max_items", "offset")}


def _error(kind: str, message: str) -> web.Response:
    return web.json_response({"error": {"type": kind, "message": message}}, status=400)


async def check(request: web.Request, path: str) -> web.Response | None:
    """``path`` is the stock route the request resolved to (no /gpuN or /api prefix); ``None`` means fine."""
    if request.method == "POST" and path in JSON_OBJECT_ROUTES:
        raw = await request.read()
        if raw.strip() or path != "/interrupt":
            try:
                body = json.loads(raw)
            except (ValueError, UnicodeDecodeError) as err:
                return _error("invalid_json", f"POST {path}: the body is not valid JSON ({err})")
            if not isinstance(body, dict):
                return _error("invalid_json", f"POST {path}: the body must be a JSON object, got "
                                              f"{type(body).__name__}")
            if path == "/prompt" and "prompt" in body and not isinstance(body["prompt"], dict):
                return _error("invalid_prompt", "POST /prompt: 'prompt' must be an object of nodes keyed by id")
            if path in ("/queue", "/history") and "delete" in body and not isinstance(body["delete"], list):
                return _error("invalid_json", f"POST {path}: 'delete' must be a list of prompt ids")
    if request.method == "GET":
        for name in INT_QUERY.get(path, ()):
            value = request.query.get(name)
            if value is not None:
                try:
                    int(value)
                except ValueError:
                    return _error("invalid_query", f"GET {path}: {name}={value!r} is not an integer")
    return None
