"""Reject malformed input to stock routes with a JSON 400 before ComfyUI's handler fails on it.

ComfyUI's handlers call ``await request.json()`` and ``int(query[...])`` unguarded and trust the types inside the
body, so bad input surfaces as an HTTP 500 with a traceback in the log, or worse: a ``client_id`` that is a list
is queued, and when the worker sends its first message to it ComfyUI's publish loop raises and the whole server
process exits. In multi-device mode the routing middleware runs these checks first; the handlers then see only
input they can use (aiohttp caches the body it read).
"""

from __future__ import annotations

import json
import math
from typing import Any

from aiohttp import web

JSON_OBJECT_ROUTES = ("/prompt", "/queue", "/interrupt", "/free", "/history")
INT_QUERY = {"/history": ("max_items", "offset")}
_SHOWN = 60  # characters of a bad value quoted back in an error message


class Invalid(Exception):
    """Input a stock handler would fail on; ``kind`` becomes ``error.type`` of the JSON answer (400 unless told)."""

    def __init__(self, kind: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.status = status


def _error(kind: str, message: str, status: int = 400) -> web.Response:
    return web.json_response({"error": {"type": kind, "message": message}}, status=status)


def _show(value: Any) -> str:
    """A bad value for an error message, cut short: the client may have sent megabytes of it."""
    text = repr(value)
    return text if len(text) <= _SHOWN else text[:_SHOWN] + "..."


def _no_constant(name: str) -> Any:
    """``json.loads`` takes NaN and Infinity, which are not JSON; ComfyUI would answer them back unparseable."""
    raise ValueError(f"{name} is not a JSON value")


async def _read(request: web.Request) -> bytes:
    """The body, or :class:`Invalid` where aiohttp's ``read`` raises.

    Over the app's ``client_max_size`` aiohttp answers a plain-text 413; a body that does not decompress as its
    ``Content-Encoding`` says raises ``RequestPayloadError``, a 500.
    """
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge as err:
        raise Invalid("body_too_large", err.text or "the body is too large", status=413) from None
    except web.RequestPayloadError as err:
        raise Invalid("invalid_body", f"the body cannot be read ({_show(str(err).strip())})") from None


async def read_json(request: web.Request) -> Any:
    """The body parsed as ``request.json()`` in ComfyUI's handler will parse it, or :class:`Invalid`.

    Decoded with the request's charset (UTF-8 when none), as aiohttp does: ``json.loads`` on the raw bytes would
    also take UTF-16 or a UTF-8 BOM, which the handler then fails to read.
    """
    raw = await _read(request)
    charset = request.charset or "utf-8"
    try:
        text = raw.decode(charset)
    except (LookupError, ValueError) as err:  # unknown or non-text codec; UnicodeError is a ValueError
        raise Invalid("invalid_json", f"the body cannot be decoded as {_show(charset)} ({err})") from None
    try:
        return json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError) as err:
        raise Invalid("invalid_json", f"the body is not valid JSON ({_show(str(err))})") from None


def _check_prompt(body: dict[str, Any]) -> None:
    """The fields of a POST /prompt body that ComfyUI uses without checking their type."""
    if "number" in body:
        try:
            number = float(body["number"])
        except (TypeError, ValueError, OverflowError):
            raise Invalid("invalid_prompt", f"'number' must be a number, got {_show(body['number'])}") from None
        if not math.isfinite(number):
            raise Invalid("invalid_prompt", f"'number' must be finite, got {_show(body['number'])}")
    if "prompt" in body:
        prompt = body["prompt"]
        if not isinstance(prompt, dict):
            raise Invalid("invalid_prompt", "'prompt' must be an object of nodes keyed by id")
        for node_id, node in prompt.items():
            if not isinstance(node, dict):
                raise Invalid("invalid_prompt", f"node {_show(node_id)} must be an object, got "
                                                f"{type(node).__name__}")
            if "class_type" in node and not isinstance(node["class_type"], str):
                raise Invalid("invalid_prompt", f"node {_show(node_id)}: 'class_type' must be a string")
    targets = body.get("partial_execution_targets")
    if targets is not None and not isinstance(targets, list):
        raise Invalid("invalid_prompt", "'partial_execution_targets' must be a list of node ids")
    if "extra_data" in body and not isinstance(body["extra_data"], dict):
        raise Invalid("invalid_prompt", "'extra_data' must be an object")
    for where, holder in (("client_id", body), ("extra_data.client_id", body.get("extra_data") or {})):
        client_id = holder.get("client_id")
        if client_id is not None and not isinstance(client_id, str):
            raise Invalid("invalid_prompt", f"'{where}' must be a string, got {type(client_id).__name__}")


def _check_ids(body: dict[str, Any], key: str) -> None:
    """``delete`` lists prompt ids; ComfyUI's history uses them as dict keys (a list item raises there)."""
    if key not in body:
        return
    ids = body[key]
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise Invalid("invalid_json", f"'{key}' must be a list of prompt ids (strings), got {_show(ids)}")


async def _check_body(request: web.Request, path: str) -> None:
    raw = await _read(request)
    if path == "/interrupt" and not raw.strip():
        return  # no body: interrupt without a prompt id, as stock ComfyUI allows
    body = await read_json(request)
    if not isinstance(body, dict):
        raise Invalid("invalid_json", f"the body must be a JSON object, got {type(body).__name__}")
    if path == "/prompt":
        _check_prompt(body)
    elif path in ("/queue", "/history"):
        _check_ids(body, "delete")
    elif path == "/interrupt":
        prompt_id = body.get("prompt_id")
        if prompt_id is not None and not isinstance(prompt_id, str):
            raise Invalid("invalid_json", f"'prompt_id' must be a string, got {type(prompt_id).__name__}")


def _check_query(request: web.Request, path: str) -> None:
    for name in INT_QUERY.get(path, ()):
        value = request.query.get(name)
        if value is not None:
            try:
                int(value)
            except ValueError:
                raise Invalid("invalid_query", f"{name}={_show(value)} is not an integer") from None


async def check(request: web.Request, path: str) -> web.Response | None:
    """``path`` is the stock route the request resolved to (no /gpuN or /api prefix); ``None`` means fine."""
    try:
        if request.method == "POST" and path in JSON_OBJECT_ROUTES:
            await _check_body(request, path)
        elif request.method == "GET":
            _check_query(request, path)
    except Invalid as err:
        return _error(err.kind, f"{request.method} {path}: {err.message}", err.status)
    return None
