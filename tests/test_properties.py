"""Property-based tests (hypothesis) of malformed and odd requests against a real multi-device server.

Properties, for every generated request:
- a malformed or invalid request gets a 4xx whose body is a JSON object with an ``error`` object (``type`` and
  ``message``), never a 5xx and never a plain-text 4xx from our layer;
- a rejected request changes nothing: each device's running and pending prompt ids, ``/debug/queues`` and the
  history are what they were;
- a valid but harmless request (an interrupt of an unknown prompt id, deleting unknown ids, paging the history)
  answers 2xx and changes nothing either;
- a target is accepted exactly when every source that gives one (``X-TARGET-GPU`` headers, entry port, ``/gpuN``
  prefix) names the same valid device, and the request then sees that device only.

So that a request which wrongly gets through is visible, every device runs a long prompt and holds a pending one
while the properties run. Requests go over raw sockets, to send bytes that urllib and http.client refuse.
"""

from __future__ import annotations

import gzip
import json
import math
import re
import socket
import time
import urllib.parse
from collections import Counter
from dataclasses import dataclass, field
from http.client import HTTPResponse
from typing import Any, Callable, Iterator

import pytest
import reliability_results
from harness import Server, prompt_id_for, request, sleep_prompt
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

N_DEVICES = 3
HEADER = "X-TARGET-GPU"
VALID_PROMPT = sleep_prompt(0.01, 1, tag="would-run")  # accepted by ComfyUI if nothing else is wrong
MAX_BODY = 100 * 1024 * 1024  # ComfyUI's default --max-upload-size (MB), aiohttp's client_max_size

SETTINGS = settings(max_examples=60, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

# -- talking to the server --------------------------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    content_type: str
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass(frozen=True)
class Where:
    """Where a request goes: main port or an entry port, a path prefix, ``X-TARGET-GPU`` values."""

    port: int | None = None  # entry port of this device; None: the main port
    prefix: str = ""  # "", "/api", "/gpu1", "/gpu1/api"
    headers: tuple[str, ...] = ()


@dataclass
class Probe:
    """Sends the requests under test and counts their answers for the reliability figures."""

    server: Server
    statuses: Counter = field(default_factory=Counter)
    baseline: dict = field(default_factory=dict)

    def send(self, method: str, path: str, body: bytes | None = None, where: Where = Where(),
             headers: tuple[tuple[bytes, bytes], ...] = (), raw_headers: tuple[bytes, ...] = ()) -> Reply:
        """One request on its own connection; ``path`` is sent as given (percent-encode it yourself)."""
        port = self.server.port if where.port is None else self.server.ports[where.port]
        lines = [f"{method} {where.prefix}{path} HTTP/1.1".encode(), f"Host: 127.0.0.1:{port}".encode(),
                 b"Connection: close"]
        lines += [HEADER.encode() + b": " + value.encode() for value in where.headers]
        lines += raw_headers
        lines += [name + b": " + value for name, value in headers]
        if body is not None:
            lines.append(f"Content-Length: {len(body)}".encode())
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(b"\r\n".join(lines) + b"\r\n\r\n" + (body or b""))
            resp = HTTPResponse(sock)
            resp.begin()
            reply = Reply(resp.status, resp.getheader("Content-Type") or "", resp.read())
        self.statuses[reply.status] += 1
        return reply

    def state(self) -> dict:
        """Running and pending ids per device, /debug/queues, the merged /queue and the history's ids."""
        def ids(queue: dict) -> tuple[list[str], list[str]]:
            return (sorted(item[1] for item in queue["queue_running"]),
                    sorted(item[1] for item in queue["queue_pending"]))

        url = self.server.url
        return {
            "devices": [ids(request("GET", url + "/queue", headers={HEADER: str(i)}).json())
                        for i in range(N_DEVICES)],
            "merged": ids(request("GET", url + "/queue").json()),
            "debug": request("GET", url + "/debug/queues").json(),
            "history": sorted(request("GET", url + "/history").json()),
        }

    def assert_unchanged(self, context: Any) -> None:
        assert self.state() == self.baseline, f"state changed after {context!r}"

    def counts(self) -> tuple[int, int, int]:
        total = sum(self.statuses.values())
        n4xx = sum(n for status, n in self.statuses.items() if 400 <= status < 500)
        n5xx = sum(n for status, n in self.statuses.items() if status >= 500)
        return total, n4xx, n5xx


def assert_json_error(reply: Reply, context: Any, status: int | None = None) -> dict:
    """A 4xx (``status`` if given) whose body is a JSON object naming the error, as our layer and ComfyUI send."""
    assert reply.status < 500, f"{reply.status} for {context!r}: {reply.body[:300]!r}"
    assert 400 <= reply.status < 500, f"{reply.status} for {context!r}: {reply.body[:300]!r}"
    if status is not None:
        assert reply.status == status, f"{reply.status} for {context!r}: {reply.body[:300]!r}"
    assert reply.content_type.startswith("application/json"), f"not JSON for {context!r}: {reply.body[:300]!r}"
    body = reply.json()
    assert isinstance(body, dict) and isinstance(body.get("error"), dict), body
    assert isinstance(body["error"].get("type"), str) and body["error"].get("message"), body
    return body


def assert_ok(reply: Reply, context: Any) -> None:
    assert 200 <= reply.status < 300, f"{reply.status} for {context!r}: {reply.body[:300]!r}"


@pytest.fixture(scope="module")
def probe(multi: Server) -> Iterator[Probe]:
    """Every device busy with a long prompt and holding a pending one, so that any change shows."""
    multi.wait_idle()
    blockers = [multi.submit(sleep_prompt(600, 6000), headers={HEADER: str(i)})["prompt_id"]
                for i in range(N_DEVICES)]
    pending = [multi.submit(sleep_prompt(0.01, 1), headers={HEADER: str(i)})["prompt_id"]
               for i in range(N_DEVICES)]
    for i, prompt_id in enumerate(blockers):
        multi.wait_running(prompt_id, headers={HEADER: str(i)})
    p = Probe(multi)
    p.baseline = p.state()
    assert p.baseline["devices"] == [([blockers[i]], [pending[i]]) for i in range(N_DEVICES)]
    try:
        yield p
    finally:
        total, n4xx, n5xx = p.counts()
        version = multi.comfy_dir.name
        reliability_results.record(f"properties ({version})", {
            "section": "properties", "comfyui": version, "requests_sent": total, "http_4xx": n4xx,
            "http_5xx": n5xx, "http_2xx": sum(n for s, n in p.statuses.items() if 200 <= s < 300),
        })
        assert multi.post("/queue", {"clear": True}).status == 200
        assert multi.post("/interrupt").status == 200
        multi.wait_idle()


def run_property(prop: Callable[..., None], probe: Probe) -> None:
    """Run ``prop`` (a ``@given`` function), then check a wrong interrupt or queue change did not land late."""
    prop()
    time.sleep(0.3)  # an interrupt is noticed within one 0.1 s step of the running prompt
    probe.assert_unchanged(prop.__name__)


# -- strategies ---------------------------------------------------------------------------------------------------

json_scalars = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
                | st.text(max_size=8))
json_values = st.recursive(json_scalars, lambda kids: st.lists(kids, max_size=3)
                           | st.dictionaries(st.text(max_size=5), kids, max_size=3), max_leaves=8)
not_str = json_values.filter(lambda v: not isinstance(v, str))
not_str_or_none = json_values.filter(lambda v: v is not None and not isinstance(v, str))
not_object = json_values.filter(lambda v: not isinstance(v, dict))
id_strings = st.text(min_size=0, max_size=20)


def where_for(target: int | None) -> st.SearchStrategy[Where]:
    """Every way of reaching ``target`` (None: no target), sources agreeing."""
    if target is None:
        return st.sampled_from([Where(), Where(prefix="/api"), Where(headers=("auto",))])
    t = str(target)
    return st.sampled_from([Where(headers=(t,)), Where(port=target), Where(prefix=f"/gpu{t}"),
                            Where(prefix=f"/gpu{t}/api"), Where(port=target, headers=(t,)),
                            Where(port=target, prefix=f"/gpu{t}", headers=(t, " auto"))])


wheres = st.sampled_from([None, *range(N_DEVICES)]).flatmap(where_for)


def encode(value: Any) -> bytes:
    return json.dumps(value).encode()


def json_object_of(raw: bytes) -> dict | None:
    """``raw`` as the JSON object ComfyUI would read (UTF-8), or None."""
    try:
        value = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def not_a_finite_number(value: Any) -> bool:
    try:
        return not math.isfinite(float(value))
    except (TypeError, ValueError, OverflowError):
        return True


def with_valid_prompt(**fields: Any) -> dict:
    return {"prompt": VALID_PROMPT, **fields}


bad_numbers = st.one_of(json_values, st.sampled_from(["nan", "inf", "-Infinity", "1e999", 10 ** 400])
                        ).filter(not_a_finite_number)
#: bodies that ComfyUI would queue were it not for the one bad field
bad_prompt_fields = st.one_of(
    bad_numbers.map(lambda v: with_valid_prompt(number=v)),
    not_object.map(lambda v: {"prompt": v}),
    not_object.map(lambda v: {"prompt": {**VALID_PROMPT, "2": v}}),
    not_str.map(lambda v: {"prompt": {"1": {"class_type": v, "inputs": {}}}}),
    json_values.filter(lambda v: v is not None and not isinstance(v, list))
    .map(lambda v: with_valid_prompt(partial_execution_targets=v)),
    not_object.map(lambda v: with_valid_prompt(extra_data=v, client_id="c")),
    not_str_or_none.map(lambda v: with_valid_prompt(client_id=v)),
    not_str_or_none.map(lambda v: with_valid_prompt(extra_data={"client_id": v})),
)
#: prompts ComfyUI's own validation rejects: CPSleep never gets its required "tag", CPFail never its "message"
node_ids = st.sampled_from(["1", "2", "3", "x"])
bad_nodes = st.fixed_dictionaries({
    "class_type": st.sampled_from(["CPSleep", "CPFail", "NoSuchNode", ""]),
    "inputs": st.dictionaries(st.sampled_from(["seconds", "steps", "x"]),
                              json_values | st.tuples(node_ids, st.integers(-1, 2)).map(list), max_size=3),
})
invalid_prompts = st.fixed_dictionaries(
    {"prompt": st.dictionaries(node_ids, bad_nodes, max_size=3)},
    optional={"partial_execution_targets": st.lists(node_ids | json_values, max_size=3),
              "client_id": id_strings, "front": json_values, "number": st.integers()})
#: objects without a prompt: ComfyUI's own "no_prompt" 400, or ours for a bad field
no_prompt_objects = st.dictionaries(st.sampled_from(["number", "front", "extra_data", "client_id", "prompt_id", "x"]),
                                    json_values, max_size=4)
#: a body ComfyUI would queue, made unreadable by its encoding or a non-JSON constant
unreadable_valid_bodies = st.one_of(
    st.sampled_from(["utf-16", "utf-16-be", "utf-32", "utf-8-sig"]).map(
        lambda enc: (json.dumps({"prompt": VALID_PROMPT}).encode(enc), ())),
    st.sampled_from([b"foo", b"rot13", b"hex", b"base64", b"undefined", b"utf-16", b"utf-32"]).map(
        lambda charset: (encode({"prompt": VALID_PROMPT}),
                         ((b"Content-Type", b"application/json; charset=" + charset),))),
    st.sampled_from([b"NaN", b"Infinity", b"-Infinity"]).map(
        lambda c: (b'{"number": ' + c + b', "prompt": ' + encode(VALID_PROMPT) + b"}", ())),
    # whatever junk decompresses to (if anything), it is not a prompt. Not deflate: aiohttp's parser refuses an
    # unfinished deflate stream itself, with a plain-text 400 before any handler runs.
    st.binary(max_size=40).map(lambda junk: (junk, ((b"Content-Encoding", b"gzip"),))),
    st.just((gzip.compress(b"[" * 100_000), ((b"Content-Encoding", b"gzip"),))),
)


# -- routing -----------------------------------------------------------------------------------------------------

def expected_header_target(value: str) -> int | None | str:
    """The target an ``X-TARGET-GPU`` value names: an index in ASCII digits, or ``auto``; else ``"bad"``."""
    v = value.strip()
    if v.lower() == "auto":
        return None
    if re.fullmatch(r"-?[0-9]+", v) and 0 <= int(v) < N_DEVICES:
        return int(v)
    return "bad"


header_alphabet = st.sampled_from(list("0123456789-+.eE xX_aAuUtToO\t") + ["\u0661", "\uff11", "\u00b2", "\u00a0",
                                                                           "\u00e9", "\u2003"])
header_values = st.one_of(
    st.text(header_alphabet, max_size=5).map(str.encode),
    st.sampled_from(["0", "1", "2", "3", "-1", "auto", "AUTO", " 1 ", "01", "1.0", "", "99999999999999999999"])
    .map(str.encode),
    # any bytes aiohttp's parser lets through (it answers control characters itself, before our layer)
    st.binary(max_size=6).map(lambda b: bytes(c for c in b if c == 9 or 32 <= c < 127 or c >= 128)),
)


def decoded_header(raw: bytes) -> str:
    """As aiohttp hands a header value to us: UTF-8, undecodable bytes as surrogates, blanks at the ends cut."""
    return raw.decode("utf-8", "surrogateescape").strip(" \t")


def device_view(probe: Probe, target: int | None) -> tuple[list[str], list[str]]:
    return probe.baseline["merged"] if target is None else probe.baseline["devices"][target]


def ids_of(reply: Reply) -> tuple[list[str], list[str]]:
    queue = reply.json()
    return (sorted(item[1] for item in queue["queue_running"]), sorted(item[1] for item in queue["queue_pending"]))


def test_header_values(probe: Probe) -> None:
    """Any X-TARGET-GPU value(s): a bad or disagreeing one is a JSON 400 and queues nothing; a good one scopes."""

    @SETTINGS
    @given(raw=st.lists(header_values, min_size=1, max_size=2))
    @example(raw=["\u0661".encode()])  # Arabic-Indic one: was accepted as device 1 (\d and int() take it)
    @example(raw=[b"1", b"2"])  # a repeated header: the first value won, the second was ignored
    @example(raw=[b"\xff"])
    def header_property(raw: list[bytes]) -> None:
        expected = [expected_header_target(decoded_header(r)) for r in raw]
        targets = {e for e in expected if e is not None}
        headers = tuple((HEADER.encode(), r) for r in raw)
        if "bad" in targets or len(targets) > 1:
            reply = probe.send("POST", "/prompt", encode({"prompt": VALID_PROMPT}), headers=headers)
            body = assert_json_error(reply, raw, status=400)
            assert body["valid_targets"] == list(range(N_DEVICES)) and body["error"]["type"] == "invalid_target"
            probe.assert_unchanged(raw)
        else:
            reply = probe.send("GET", "/queue", headers=headers)
            assert_ok(reply, raw)
            assert ids_of(reply) == device_view(probe, next(iter(targets), None)), raw

    run_property(header_property, probe)


prefix_alphabet = st.sampled_from(list("0123456789-+._ aZ") + ["\u0661", "\uff11", "\u00e9"])


def expected_prefix(text: str) -> int | None | str:
    """``/gpu<text>/``: a device index spelled as registered, not a device prefix at all (None), or ``"bad"``."""
    if text and (text[0].isalpha() or text[0] == "_"):
        return None  # /gpu_stats, /gpuZ: an ordinary path, not ours to judge
    return int(text) if text in {str(i) for i in range(N_DEVICES)} else "bad"


def test_path_prefixes(probe: Probe) -> None:
    """Any /gpu<text>/ prefix (optionally nested): a bad one is a JSON 400 naming the valid targets."""

    @SETTINGS
    @given(text=st.text(prefix_alphabet, max_size=4), nested=st.none() | st.text(prefix_alphabet, max_size=2),
           api=st.booleans())
    @example(text="1", nested=None, api=True)
    @example(text="01", nested=None, api=False)  # accepted as device 1, then no /gpu01 resource: a text 404
    @example(text="-0", nested=None, api=False)
    @example(text=" 1", nested=None, api=False)
    @example(text="\u0661", nested=None, api=False)
    @example(text="1", nested="2", api=False)  # /gpu1/gpu2/queue ran on device 1
    def prefix_property(text: str, nested: str | None, api: bool) -> None:
        first = expected_prefix(text)
        inner = None if nested is None else expected_prefix(nested)
        path = "/gpu" + urllib.parse.quote(text, safe="")
        if nested is not None:
            path += "/gpu" + urllib.parse.quote(nested, safe="")
        path += "/api" if api else ""
        if first is None:
            reply = probe.send("POST", path + "/prompt", encode({"prompt": VALID_PROMPT}))
            assert reply.status < 500 and reply.status != 200, (path, reply)
            probe.assert_unchanged(path)
        elif first == "bad" or (nested is not None and inner is not None):  # bad, or nested device prefixes
            reply = probe.send("POST", path + "/prompt", encode({"prompt": VALID_PROMPT}))
            body = assert_json_error(reply, path, status=400)
            assert body["valid_targets"] == list(range(N_DEVICES)) and body["error"]["type"] == "invalid_target"
            probe.assert_unchanged(path)
        elif nested is not None:
            reply = probe.send("GET", path + "/queue")  # /gpu1/gpuZ/queue: no such route
            assert reply.status == 404, (path, reply)
        else:
            reply = probe.send("GET", path + "/queue")
            assert_ok(reply, path)
            assert ids_of(reply) == device_view(probe, first), path

    run_property(prefix_property, probe)


def test_entry_ports_headers_and_prefixes_must_agree(probe: Probe) -> None:
    """Entry port, /gpuN prefix and X-TARGET-GPU together: any disagreement is a 400 that queues nothing."""
    sources = st.none() | st.integers(0, N_DEVICES - 1)

    @SETTINGS
    @given(port=sources, prefix=sources, header=sources | st.just("auto"))
    @example(port=0, prefix=None, header=1)
    @example(port=0, prefix=1, header=None)
    @example(port=None, prefix=1, header=2)
    def agreement_property(port: int | None, prefix: int | None, header: int | str | None) -> None:
        where = Where(port=port, prefix="" if prefix is None else f"/gpu{prefix}",
                      headers=() if header is None else (str(header),))
        named = {t for t in (port, prefix, header) if isinstance(t, int)}
        if len(named) > 1:
            reply = probe.send("POST", "/prompt", encode({"prompt": VALID_PROMPT}), where=where)
            body = assert_json_error(reply, where, status=400)
            assert "conflicting" in body["error"]["message"], body
            probe.assert_unchanged(where)
        else:
            reply = probe.send("GET", "/queue", where=where)
            assert_ok(reply, where)
            assert ids_of(reply) == device_view(probe, next(iter(named), None)), where

    run_property(agreement_property, probe)


# -- bodies and queries ------------------------------------------------------------------------------------------

def post_rejected(probe: Probe, path: str, body: bytes, where: Where,
                  headers: tuple[tuple[bytes, bytes], ...] = ((b"Content-Type", b"application/json"),),
                  status: int | None = None) -> dict:
    reply = probe.send("POST", path, body, where=where, headers=headers)
    error = assert_json_error(reply, (path, body[:200], where, headers), status=status)
    probe.assert_unchanged((path, body[:200], where))
    return error


def test_prompt_bodies(probe: Probe) -> None:
    """Malformed or invalid POST /prompt bodies: a JSON 4xx, nothing queued, never a 500."""

    @SETTINGS
    @given(body=st.one_of(bad_prompt_fields.map(encode), invalid_prompts.map(encode),
                          no_prompt_objects.map(encode), not_object.map(encode), st.binary(max_size=64)),
           where=wheres)
    @example(body=encode({"number": "abc"}), where=Where())  # float("abc") in ComfyUI: 500
    @example(body=encode({"prompt": {"1": "class_type"}}), where=Where())  # "class_type" in "..." then [...]: 500
    @example(body=encode({"prompt": {"1": 5}}), where=Where())  # 500
    @example(body=encode({"prompt": {"1": {"class_type": []}}}), where=Where())  # unhashable in a dict lookup: 500
    @example(body=encode(with_valid_prompt(partial_execution_targets=5)), where=Where())  # `x in 5`: 500
    @example(body=encode({"prompt": {"1": {"class_type": "NoSuchNode"}}, "extra_data": [], "client_id": "c"}),
             where=Where())  # extra_data["client_id"] = ... on a list: 500
    @example(body=encode(with_valid_prompt(client_id=[1])), where=Where())  # queued; the worker's first message to
    # sid [1] raised in ComfyUI's publish loop and the whole server process exited
    @example(body=b"[" * 100_000, where=Where())  # RecursionError in our own json.loads: 500
    def prompt_property(body: bytes, where: Where) -> None:
        post_rejected(probe, "/prompt", body, where)

    run_property(prompt_property, probe)


def test_prompt_bodies_that_cannot_be_read(probe: Probe) -> None:
    """A valid prompt sent in an encoding ComfyUI's ``request.json()`` cannot read: a JSON 400, never queued."""

    @SETTINGS
    @given(case=unreadable_valid_bodies, where=wheres)
    @example(case=(json.dumps({"prompt": VALID_PROMPT}).encode("utf-16"), ()), where=Where())  # our check read it
    # (json.loads takes UTF-16 bytes), ComfyUI's request.json() failed on it: 500
    @example(case=(b"\xef\xbb\xbf" + encode({"prompt": VALID_PROMPT}), ()), where=Where())  # UTF-8 BOM: 500
    @example(case=(encode({"prompt": VALID_PROMPT}), ((b"Content-Type", b"application/json; charset=foo"),)),
             where=Where())  # LookupError in request.text(): 500
    @example(case=(b'{"number": NaN, "prompt": ' + encode(VALID_PROMPT) + b"}", ()), where=Where())  # queued, and
    # answered with "number": NaN, which is not JSON
    @example(case=(b"garbage", ((b"Content-Encoding", b"gzip"),)), where=Where())  # RequestPayloadError: 500
    def unreadable_property(case: tuple[bytes, tuple[tuple[bytes, bytes], ...]], where: Where) -> None:
        body, headers = case
        post_rejected(probe, "/prompt", body, where, headers=headers, status=400)

    run_property(unreadable_property, probe)


def test_oversized_body_is_a_json_413(probe: Probe) -> None:
    """Over ComfyUI's upload limit: aiohttp's own 413 is plain text; ours is JSON, and nothing is queued."""
    post_rejected(probe, "/prompt", b" " * (MAX_BODY + 1), Where(), status=413)


bad_id_lists = st.one_of(json_values.filter(lambda v: not isinstance(v, list)),
                         st.lists(json_values, min_size=1, max_size=3).filter(
                             lambda v: not all(isinstance(i, str) for i in v)))
not_json_objects = st.one_of(not_object.map(encode), st.binary(min_size=1, max_size=48).filter(
    lambda raw: raw.strip() != b"" and json_object_of(raw) is None))


def test_queue_and_history_posts(probe: Probe) -> None:
    """POST /queue and /history: malformed is a JSON 400 changing nothing (not even with "clear": true
    alongside); deleting unknown ids is a harmless 200."""

    @SETTINGS
    @given(path=st.sampled_from(["/queue", "/history"]), where=wheres,
           body=st.one_of(not_json_objects,
                          st.fixed_dictionaries({"delete": bad_id_lists}, optional={"clear": st.just(True)})
                          .map(encode)))
    @example(path="/history", where=Where(), body=encode({"clear": True, "delete": [[1]]}))  # the history was
    # wiped, then ComfyUI's pop([1]) raised: 500 after the damage
    @example(path="/queue", where=Where(), body=encode({"clear": True, "delete": "abc"}))
    def rejected_property(path: str, where: Where, body: bytes) -> None:
        post_rejected(probe, path, body, where, status=400)

    @SETTINGS
    @given(path=st.sampled_from(["/queue", "/history"]), where=wheres,
           body=st.fixed_dictionaries({}, optional={
               "delete": st.lists(id_strings, max_size=3),
               "clear": st.sampled_from([False, 0, "", None, [], {}])}))
    def harmless_property(path: str, where: Where, body: dict) -> None:
        reply = probe.send("POST", path, encode(body), where=where)
        assert_ok(reply, (path, body, where))
        probe.assert_unchanged((path, body, where))

    run_property(rejected_property, probe)
    run_property(harmless_property, probe)


def test_interrupt_bodies(probe: Probe) -> None:
    """POST /interrupt: malformed is a JSON 400; an unknown prompt id is a 200 that stops nothing, anywhere."""

    @SETTINGS
    @given(where=wheres, body=st.one_of(not_json_objects, not_str_or_none.map(lambda v: encode({"prompt_id": v}))))
    @example(where=Where(), body=encode({"prompt_id": []}))  # stock 0.3.75 reads [] as "no id": interrupt all
    def rejected_property(where: Where, body: bytes) -> None:
        post_rejected(probe, "/interrupt", body, where, status=400)

    @SETTINGS
    @given(where=wheres, prompt_id=id_strings.filter(lambda s: s != ""), extra=st.dictionaries(
        st.sampled_from(["x", "client_id"]), json_values, max_size=2))
    @example(where=Where(), prompt_id=prompt_id_for("interrupt-unknown"), extra={})  # what a 0.33 client sends
    @example(where=Where(port=1), prompt_id=prompt_id_for("interrupt-unknown"), extra={})
    def harmless_property(where: Where, prompt_id: str, extra: dict) -> None:
        reply = probe.send("POST", "/interrupt", encode({**extra, "prompt_id": prompt_id}), where=where)
        assert_ok(reply, (prompt_id, where))
        probe.assert_unchanged((prompt_id, where))

    run_property(rejected_property, probe)
    run_property(harmless_property, probe)


def test_free_bodies(probe: Probe) -> None:
    """POST /free: malformed is a JSON 400; any JSON object is a 200 that leaves the queues alone."""

    @SETTINGS
    @given(where=wheres, body=not_json_objects)
    @example(where=Where(), body=b"\xff\xfe")
    def rejected_property(where: Where, body: bytes) -> None:
        post_rejected(probe, "/free", body, where, status=400)

    @SETTINGS
    @given(where=wheres, body=st.fixed_dictionaries({}, optional={
        "unload_models": st.booleans(), "free_memory": st.booleans(), "x": json_values}))
    def harmless_property(where: Where, body: dict) -> None:
        reply = probe.send("POST", "/free", encode(body), where=where)
        assert_ok(reply, (body, where))
        probe.assert_unchanged((body, where))

    run_property(rejected_property, probe)
    run_property(harmless_property, probe)


def int_parses(value: str) -> bool:
    try:
        int(value)
    except ValueError:
        return False
    return True


def test_history_query(probe: Probe) -> None:
    """GET /history?max_items=&offset=: what ``int()`` reads pages the history, anything else is a JSON 400."""
    query_values = st.one_of(st.integers(-5, 5).map(str), st.text(max_size=6),
                             st.sampled_from(["1.5", "0x1", " 2 ", "1_0", "\u0665", "9" * 40, ""]))

    @SETTINGS
    @given(where=wheres, params=st.dictionaries(st.sampled_from(["max_items", "offset"]), query_values,
                                                max_size=2))
    @example(where=Where(), params={"max_items": "9" * 5000})  # over int()'s 4300 digits: a ValueError (the
    # request line of two such values is over aiohttp's 8190 bytes, which its parser refuses before our layer)
    def query_property(where: Where, params: dict[str, str]) -> None:
        query = urllib.parse.urlencode(params, quote_via=urllib.parse.quote)
        reply = probe.send("GET", "/history" + ("?" + query if query else ""), where=where)
        if all(int_parses(v) for v in params.values()):
            assert_ok(reply, params)
            assert isinstance(reply.json(), dict)
        else:
            body = assert_json_error(reply, params, status=400)
            assert body["error"]["type"] == "invalid_query", body
        probe.assert_unchanged(params)

    run_property(query_property, probe)


def test_no_5xx_recorded(probe: Probe) -> None:
    """Last in the module: the figures it records say no request of this module got a 5xx."""
    total, _, n5xx = probe.counts()
    assert total > 0 and n5xx == 0, probe.statuses
