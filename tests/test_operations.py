"""Operations: /metrics, /health, /ready, the periodic log line, OOM retry, worker crash and executor rebuild."""

from __future__ import annotations

import re
import time
import uuid

from harness import Server, record_of, sleep_prompt
from prometheus_client.parser import text_string_to_metric_families


def metric(server: Server, name: str, **labels: str) -> float:
    """One sample of ``/metrics``, read with prometheus_client's own parser."""
    for family in text_string_to_metric_families(server.get("/metrics").body.decode()):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    raise AssertionError(f"{name}{labels} not in /metrics")


def oom_prompt(times: int) -> dict:
    return {"1": {"class_type": "CPOOM", "inputs": {"times": times, "tag": uuid.uuid4().hex}}}


def test_health_ready_and_metrics(idle_multi: Server) -> None:
    s = idle_multi
    assert s.get("/health").json() == {"status": "ok"}
    ready = s.get("/ready")
    assert ready.status == 200 and ready.json()["ready"] is True and len(ready.json()["workers"]) == 3
    assert len(re.findall(r"\[GPU \d\] worker started on cpu#\d; device warm-up \d+ ms", s.log())) == 3
    resp = s.get("/metrics")
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain")
    before = metric(s, "comfy_parallel_prompts_total", device="2", outcome="success")
    waits_before = metric(s, "comfy_parallel_queue_wait_seconds_count", device="2")
    for _ in range(2):
        s.wait_history(s.submit(sleep_prompt(0.05, 1), headers={"X-TARGET-GPU": "2"})["prompt_id"])
    failed = s.submit({"1": {"class_type": "CPFail", "inputs": {"message": "x"}}}, headers={"X-TARGET-GPU": "2"})
    s.wait_history(failed["prompt_id"])
    assert metric(s, "comfy_parallel_prompts_total", device="2", outcome="success") == before + 2
    assert metric(s, "comfy_parallel_prompts_total", device="2", outcome="error") >= 1
    assert metric(s, "comfy_parallel_queue_wait_seconds_count", device="2") == waits_before + 3
    assert metric(s, "comfy_parallel_execution_seconds_count", device="2") >= 3
    busy = s.submit(sleep_prompt(3, 30), headers={"X-TARGET-GPU": "1"})["prompt_id"]
    s.submit(sleep_prompt(0.05, 1), headers={"X-TARGET-GPU": "1"})
    s.wait_running(busy)
    assert metric(s, "comfy_parallel_queue_length", device="1") == 1
    assert metric(s, "comfy_parallel_running", device="1") == 1
    assert f'prompt_id="{busy}"' in s.get("/metrics").body.decode()
    assert s.post("/interrupt", headers={"X-TARGET-GPU": "1"}).status == 200
    s.wait_idle()


def test_periodic_log_line_every_ten_tasks(idle_multi: Server) -> None:
    s = idle_multi
    ids = [s.submit(sleep_prompt(0.01, 1), headers={"X-TARGET-GPU": "0"})["prompt_id"] for _ in range(10)]
    for p in ids:
        s.wait_history(p)
    time.sleep(0.5)
    lines = re.findall(r"\[GPU 0\] tasks=\d+, success=[\d.]+%, queue=[\d.]+, wait=\d+ms, exec=\d+ms, oom=\d+",
                       s.log())
    assert lines, s.log()[-2000:]


def test_oom_frees_the_device_and_retries_once(idle_multi: Server) -> None:
    s = idle_multi
    oom_before = metric(s, "comfy_parallel_oom_total", device="1")
    ok = s.submit(oom_prompt(times=1), headers={"X-TARGET-GPU": "1"})
    entry = s.wait_history(ok["prompt_id"])
    assert entry["status"]["status_str"] == "success" and entry["gpu_id"] == 1
    assert record_of(entry)["thread"] == "comfy-parallel-worker-1"
    assert metric(s, "comfy_parallel_oom_total", device="1") == oom_before + 1

    bad = s.submit(oom_prompt(times=2), headers={"X-TARGET-GPU": "1"})
    entry = s.wait_history(bad["prompt_id"])
    assert entry["status"]["status_str"] == "error"
    events = [event for event, _ in entry["status"]["messages"]]
    assert "execution_error" in events and "comfy_parallel_oom" in events
    history = s.get("/history").json()
    assert list(history).count(bad["prompt_id"]) == 1
    assert metric(s, "comfy_parallel_oom_total", device="1") == oom_before + 3
    assert metric(s, "comfy_parallel_oom_total", device="0") == metric(s, "comfy_parallel_oom_total", device="0")
    # the worker keeps serving
    nxt = s.submit(sleep_prompt(0.05, 1), headers={"X-TARGET-GPU": "1"})
    assert s.wait_history(nxt["prompt_id"])["status"]["status_str"] == "success"


def test_worker_crash_is_recorded_and_worker_restarts(idle_multi: Server) -> None:
    s = idle_multi
    crash = s.submit({"1": {"class_type": "CPCrash", "inputs": {"tag": uuid.uuid4().hex}}},
                     headers={"X-TARGET-GPU": "2"})
    queued = s.submit(sleep_prompt(0.05, 1), headers={"X-TARGET-GPU": "2"})
    entry = s.wait_history(crash["prompt_id"], timeout=30)
    assert entry["status"]["status_str"] == "error"
    assert "crashed" in str(entry["status"]["messages"])
    assert s.wait_history(queued["prompt_id"], timeout=30)["status"]["status_str"] == "success"
    assert metric(s, "comfy_parallel_worker_restarts_total", device="2", reason="crash") >= 1
    assert s.get("/ready").json()["ready"] is True
    assert "worker crashed (WorkerCrash" in s.log()


def test_three_consecutive_failures_rebuild_the_executor(idle_multi: Server) -> None:
    s = idle_multi
    for _ in range(3):
        p = s.submit({"1": {"class_type": "CPFail", "inputs": {"message": "x"}}}, headers={"X-TARGET-GPU": "0"})
        s.wait_history(p["prompt_id"])
    nxt = s.submit(sleep_prompt(0.05, 1), headers={"X-TARGET-GPU": "0"})
    assert s.wait_history(nxt["prompt_id"])["status"]["status_str"] == "success"
    assert metric(s, "comfy_parallel_worker_restarts_total", device="0", reason="rebuild") >= 1
    assert "[GPU 0] 3 consecutive failures: rebuilding the executor" in s.log()


def test_free_collects_on_every_worker(idle_multi: Server) -> None:
    """/free makes each of the three workers unload and collect at once; none is skipped for another's (a worker
    may also make its periodic call meanwhile, so at least three)."""
    s = idle_multi
    runs = metric(s, "comfy_parallel_gc_collections_total", result="run")
    seconds = metric(s, "comfy_parallel_gc_seconds_total")
    assert s.post("/free", {"unload_models": True, "free_memory": True}).status == 200
    deadline = time.monotonic() + 60
    while metric(s, "comfy_parallel_gc_collections_total", result="run") < runs + 3:
        assert time.monotonic() < deadline, "fewer than 3 full collections after /free"
        time.sleep(0.1)
    assert metric(s, "comfy_parallel_gc_seconds_total") > seconds
