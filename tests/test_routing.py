"""Every routing mode (header, entry port, path prefix, browser cookie, auto) and every bad target, over real HTTP."""

from __future__ import annotations

import http.client
import json

import pytest
from harness import Server, record_of, sleep_prompt

from comfy_parallel.server.routing import COOKIE, is_ui_entry, resolve, to_root


def _history_ids(server: Server) -> set[str]:
    return set(server.get("/history").json())


@pytest.mark.parametrize("index", [0, 1, 2])
def test_header_routes_to_device(idle_multi: Server, index: int) -> None:
    resp = idle_multi.submit(sleep_prompt(0.05, 1), headers={"X-TARGET-GPU": str(index)})
    assert resp["gpu_id"] == index
    entry = idle_multi.wait_history(resp["prompt_id"])
    assert entry["gpu_id"] == index
    assert entry["status"]["status_str"] == "success"
    assert record_of(entry)["thread"] == f"comfy-parallel-worker-{index}"


@pytest.mark.parametrize("index", [0, 1, 2])
def test_entry_port_routes_to_device(idle_multi: Server, index: int) -> None:
    resp = idle_multi.submit(sleep_prompt(0.05, 1), base=idle_multi.entry_url(index))
    assert resp["gpu_id"] == index
    entry = idle_multi.wait_history(resp["prompt_id"])
    assert record_of(entry)["thread"] == f"comfy-parallel-worker-{index}"
    # the entry port serves every route, not only /prompt
    assert idle_multi.get("/history/" + resp["prompt_id"], base=idle_multi.entry_url(index)).json()


@pytest.mark.parametrize("path", ["/gpu{i}/prompt", "/gpu{i}/api/prompt"])
def test_prefix_routes_to_device(idle_multi: Server, path: str) -> None:
    for index in range(3):
        resp = idle_multi.submit(sleep_prompt(0.05, 1), path=path.format(i=index))
        assert resp["gpu_id"] == index
        assert record_of(idle_multi.wait_history(resp["prompt_id"]))["thread"] == f"comfy-parallel-worker-{index}"


def test_prefix_serves_every_route(idle_multi: Server) -> None:
    ui = idle_multi.get("/gpu1/")
    assert ui.status == 200 and b"<html" in ui.body.lower()
    stock_ui = idle_multi.get("/")
    assert ui.body == stock_ui.body
    assert idle_multi.get("/gpu2/object_info/CPSleep").json() == idle_multi.get("/object_info/CPSleep").json()
    assert idle_multi.get("/gpu0/api/queue").status == 200
    redirect = idle_multi.get("/gpu1")  # urllib follows the redirect to /gpu1/
    assert redirect.status == 200 and redirect.body == ui.body
    for headers in ({}, {"X-TARGET-GPU": "1"}):  # a prefix agreeing with the header is redirected as well
        conn = http.client.HTTPConnection("127.0.0.1", idle_multi.port, timeout=10)
        conn.request("GET", "/gpu1", headers=headers)
        raw = conn.getresponse()
        assert (raw.status, raw.getheader("Location")) == (301, "/gpu1/"), headers
        conn.close()
    assert idle_multi.get("/gpu1/no/such/route").status == 404


@pytest.fixture(scope="module")
def auto_multi(comfy_dir):
    """Three CPU workers with ``--default-route auto`` (the session's ``multi`` runs the default, the pool)."""
    server = Server(comfy_dir, mode="multi", devices="cpu,cpu,cpu", serve_args=["--default-route", "auto"],
                    name=f"auto-multi-{comfy_dir.name}").start()
    yield server
    server.stop()


def test_auto_routes_to_shortest_queue_ties_to_lowest(auto_multi: Server) -> None:
    auto_multi.wait_idle()
    assert auto_multi.get("/multigpu/status").json()["default_route"] == "auto"
    first = auto_multi.submit(sleep_prompt(0.05, 1))
    assert first["gpu_id"] == 0  # all idle: lowest index
    auto_multi.wait_history(first["prompt_id"])
    busy0 = auto_multi.submit(sleep_prompt(3, 30), headers={"X-TARGET-GPU": "0"})
    busy2 = auto_multi.submit(sleep_prompt(3, 30), headers={"X-TARGET-GPU": "2"})
    auto = auto_multi.submit(sleep_prompt(3, 30))
    assert auto["gpu_id"] == 1
    auto2 = auto_multi.submit(sleep_prompt(0.05, 1))
    assert auto2["gpu_id"] == 0  # 0, 1 and 2 each hold one now: tie, lowest index
    assert auto_multi.post("/interrupt").status == 200
    for p in (busy0, busy2, auto, auto2):
        auto_multi.wait_history(p["prompt_id"])


def test_untargeted_prompts_go_to_the_pool_by_default(idle_multi: Server) -> None:
    """The default route is the pool: the answer names no device, the history entry names the one that ran it."""
    assert idle_multi.get("/multigpu/status").json()["default_route"] == "pool"
    reply = idle_multi.submit(sleep_prompt(0.05, 1))
    assert reply["gpu_id"] is None and reply["route"] == "pool"
    entry = idle_multi.wait_history(reply["prompt_id"])
    assert entry["gpu_id"] in (0, 1, 2)


BAD_HEADERS = ["x", "-1", "3", "1.5", "", " ", "0x1", "99999999999999999999"]


@pytest.mark.parametrize("value", BAD_HEADERS)
def test_bad_header_is_rejected_and_changes_nothing(idle_multi: Server, value: str) -> None:
    before = _history_ids(idle_multi)
    resp = idle_multi.post("/prompt", {"prompt": sleep_prompt(0.05, 1)}, headers={"X-TARGET-GPU": value})
    assert resp.status == 400
    body = resp.json()
    assert body["valid_targets"] == [0, 1, 2]
    assert "X-TARGET-GPU" in body["error"]["message"]
    assert idle_multi.get("/debug/queues").json() == {
        "queues": [{"gpu_id": i, "queued": 0, "running": 0} for i in range(3)]}
    assert _history_ids(idle_multi) == before


@pytest.mark.parametrize("path", ["/gpu3/prompt", "/gpu-1/prompt", "/gpu/prompt", "/gpu1.5/prompt",
                                  "/gpu3/api/prompt", "/gpu07x/queue"])
def test_bad_prefix_is_rejected(idle_multi: Server, path: str) -> None:
    resp = idle_multi.post(path, {"prompt": sleep_prompt(0.05, 1)})
    assert resp.status == 400
    assert resp.json()["valid_targets"] == [0, 1, 2]
    assert all(q["queued"] == 0 and q["running"] == 0 for q in idle_multi.get("/debug/queues").json()["queues"])


def test_bad_target_on_get_routes_too(idle_multi: Server) -> None:
    assert idle_multi.get("/queue", headers={"X-TARGET-GPU": "7"}).status == 400
    assert idle_multi.get("/gpu9/").status == 400
    assert idle_multi.get("/gpu9/ws").status == 400


def test_conflicting_targets_are_rejected(idle_multi: Server) -> None:
    prompt = {"prompt": sleep_prompt(0.05, 1)}
    cases = [
        dict(base=idle_multi.entry_url(0), headers={"X-TARGET-GPU": "1"}, path="/prompt"),
        dict(base=None, headers={"X-TARGET-GPU": "2"}, path="/gpu1/prompt"),
        dict(base=idle_multi.entry_url(0), headers=None, path="/gpu1/prompt"),
    ]
    for case in cases:
        resp = idle_multi.post(case["path"], prompt, headers=case["headers"], base=case["base"])
        assert resp.status == 400, case
        assert "conflicting" in resp.json()["error"]["message"]
    # agreeing sources are fine
    ok = idle_multi.submit(sleep_prompt(0.05, 1), base=idle_multi.entry_url(2), headers={"X-TARGET-GPU": "2"},
                           path="/gpu2/prompt")
    assert ok["gpu_id"] == 2
    idle_multi.wait_history(ok["prompt_id"])


def test_debug_queues_format(idle_multi: Server) -> None:
    busy = idle_multi.submit(sleep_prompt(2, 20), headers={"X-TARGET-GPU": "1"})
    queued = idle_multi.submit(sleep_prompt(0.05, 1), headers={"X-TARGET-GPU": "1"})
    idle_multi.wait_running(busy["prompt_id"])
    assert idle_multi.get("/debug/queues").json() == {"queues": [
        {"gpu_id": 0, "queued": 0, "running": 0},
        {"gpu_id": 1, "queued": 1, "running": 1},
        {"gpu_id": 2, "queued": 0, "running": 0},
    ]}
    for p in (busy, queued):
        idle_multi.wait_history(p["prompt_id"])


@pytest.mark.parametrize("method,path,body", [
    ("POST", "/prompt", b"{not json"),
    ("POST", "/gpu1/api/prompt", b"[1, 2]"),
    ("POST", "/prompt", b'{"prompt": "text"}'),
    ("POST", "/queue", b"nope"),
    ("POST", "/queue", b'{"delete": "abc"}'),
    ("POST", "/free", b"\xff\xfe"),
    ("POST", "/history", b'{"delete": 5}'),
    ("POST", "/interrupt", b"{bad"),
    ("GET", "/history?max_items=abc", None),
    ("GET", "/api/history?offset=1.5", None),
])
def test_malformed_input_is_a_json_400_not_a_500(idle_multi: Server, method: str, path: str,
                                                 body: bytes | None) -> None:
    from harness import request

    before = idle_multi.get("/debug/queues").json()
    resp = request(method, idle_multi.url + path, body=body, headers={"Content-Type": "application/json"})
    assert resp.status == 400, resp.body
    assert resp.json()["error"]["message"]
    assert idle_multi.get("/debug/queues").json() == before


# -- the browser binding: /gpuN/ sets a cookie that later requests carry --------------------------------------------
def _raw(server: Server, method: str, path: str, headers: dict | None = None, body: bytes | None = None,
         port: int | None = None) -> http.client.HTTPResponse:
    """One request without following redirects (urllib would), the response read."""
    conn = http.client.HTTPConnection("127.0.0.1", port or server.port, timeout=30)
    conn.request(method, path, body=body, headers=headers or {})
    resp = conn.getresponse()
    resp.read()
    conn.close()
    return resp


def _bound(index: int | str) -> dict:
    return {"Cookie": f"{COOKIE}={index}"}


@pytest.mark.parametrize("cookie,headers,path,port,expected", [
    (1, {}, "/prompt", None, (1, "cookie")),
    (1, {}, "/ws", None, (1, "cookie")),
    (1, {"X-TARGET-GPU": "2"}, "/prompt", None, (2, "header")),  # explicit beats the binding, no 400
    (1, {"X-TARGET-GPU": "auto"}, "/prompt", None, (None, "none")),  # so does an explicit "auto"
    (1, {}, "/gpu0/api/prompt", None, (0, "prefix")),
    (1, {}, "/prompt", 9002, (2, "port")),  # the cookie reaches every port of the host
    (None, {}, "/prompt", None, (None, "none")),
])
def test_resolve_cookie_is_the_lowest_source(cookie: int | None, headers: dict, path: str, port: int | None,
                                             expected: tuple) -> None:
    route = resolve(headers, path, port, 3, {9000: 0, 9001: 1, 9002: 2}, cookie)
    assert (route.target, route.source) == expected


def test_ui_entry_and_relative_root() -> None:
    assert [is_ui_entry(p) for p in ("/gpu1/", "/gpu12/index.html", "/gpu1", "/gpu01/", "/gpu1/api/prompt",
                                     "/gpu1/index.htm", "/", "/gpu/")] == [1, 12, None, None, None, None, None, None]
    assert [to_root(p) for p in ("/gpu1/", "/gpu1/index.html", "/multigpu/unbind", "/gpu2/api/multigpu/unbind",
                                 "/x")] == ["../", "../", "../", "../../../", "./"]


def test_ui_entry_binds_the_browser_and_redirects_to_the_root(idle_multi: Server) -> None:
    for path in ("/gpu2/", "/gpu2/index.html"):
        resp = _raw(idle_multi, "GET", path)
        assert resp.status == 303 and resp.getheader("Location") == "../", path
        cookie = resp.getheader("Set-Cookie")
        assert cookie.startswith(f"{COOKIE}=2;"), cookie
        assert "Path=/" in cookie and "HttpOnly" in cookie and "SameSite=Lax" in cookie
    # a prefix that disagrees with the entry port is still a conflict, not a new binding
    resp = _raw(idle_multi, "GET", "/gpu2/", port=idle_multi.ports[0])
    assert resp.status == 400 and resp.getheader("Set-Cookie") is None
    # the other routes under /gpuN/ are not redirected: API clients keep their prefix
    assert _raw(idle_multi, "GET", "/gpu2/api/queue").status == 200
    assert _raw(idle_multi, "GET", "/gpu2/queue").getheader("Set-Cookie") is None


def test_cookie_routes_prompts_and_scopes_the_queue(idle_multi: Server) -> None:
    busy = idle_multi.submit(sleep_prompt(30, 300), headers={"X-TARGET-GPU": "0"})
    try:
        idle_multi.wait_running(busy["prompt_id"])
        resp = idle_multi.submit(sleep_prompt(0.05, 1), headers=_bound(2))
        assert resp["gpu_id"] == 2
        assert record_of(idle_multi.wait_history(resp["prompt_id"]))["thread"] == "comfy-parallel-worker-2"
        assert idle_multi.get("/api/queue", headers=_bound(2)).json()["queue_running"] == []
        assert len(idle_multi.get("/queue").json()["queue_running"]) == 1  # unbound: the merged view
        # explicit sources win over the binding without a 400
        assert idle_multi.submit(sleep_prompt(0.05, 1), headers={**_bound(2), "X-TARGET-GPU": "1"})["gpu_id"] == 1
        assert idle_multi.submit(sleep_prompt(0.05, 1), headers=_bound(2), base=idle_multi.entry_url(1))[
            "gpu_id"] == 1
        assert idle_multi.submit(sleep_prompt(0.05, 1), headers=_bound(2), path="/gpu1/prompt")["gpu_id"] == 1
    finally:
        idle_multi.post("/interrupt")
        idle_multi.wait_idle()


@pytest.mark.parametrize("value", ["7", "x", "-1", "01x"])
def test_stale_cookie_is_ignored_and_cleared(idle_multi: Server, value: str) -> None:
    body = json.dumps({"prompt": sleep_prompt(0.05, 1)}).encode()
    resp = _raw(idle_multi, "POST", "/prompt", headers={**_bound(value), "Content-Type": "application/json"},
                body=body)
    assert resp.status == 200
    cleared = resp.getheader("Set-Cookie")
    assert cleared is not None and cleared.startswith(f'{COOKIE}="";') and "Max-Age=0" in cleared, cleared
    assert _raw(idle_multi, "GET", "/queue", headers=_bound("1")).getheader("Set-Cookie") is None
    idle_multi.wait_idle()


def test_unbind_clears_the_cookie(idle_multi: Server) -> None:
    for path in ("/multigpu/unbind", "/api/multigpu/unbind", "/gpu1/multigpu/unbind"):
        resp = _raw(idle_multi, "GET", path, headers=_bound(1))
        assert resp.status == 303, path
        assert resp.getheader("Location") == to_root(path)
        cleared = resp.getheader("Set-Cookie")
        assert cleared.startswith(f'{COOKIE}="";') and "Max-Age=0" in cleared and "Path=/" in cleared, cleared
