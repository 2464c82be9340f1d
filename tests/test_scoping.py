"""Concurrent execution, and queue / interrupt / free scoped to the targeted device."""

from __future__ import annotations

import io
import time

from PIL import Image

from harness import Server, record_of, sleep_prompt

H = [{"X-TARGET-GPU": str(i)} for i in range(3)]


def test_prompts_on_different_devices_run_at_the_same_time(idle_multi: Server) -> None:
    ids = [idle_multi.submit(sleep_prompt(2.0, 10), headers=H[i])["prompt_id"] for i in range(3)]
    records = [record_of(idle_multi.wait_history(p)) for p in ids]
    assert {r["thread"] for r in records} == {f"comfy-parallel-worker-{i}" for i in range(3)}
    latest_start = max(r["start"] for r in records)
    earliest_end = min(r["end"] for r in records)
    assert latest_start < earliest_end, f"runs did not overlap: {records}"
    # three 2 s prompts in parallel finish well before 6 s of serial work
    assert max(r["end"] for r in records) - min(r["start"] for r in records) < 5.0


def test_same_device_runs_in_order(idle_multi: Server) -> None:
    ids = [idle_multi.submit(sleep_prompt(0.3, 3), headers=H[1])["prompt_id"] for _ in range(3)]
    records = [record_of(idle_multi.wait_history(p)) for p in ids]
    for a, b in zip(records, records[1:]):
        assert a["end"] <= b["start"] + 1e-3


def test_queue_view_and_edits_are_scoped(idle_multi: Server) -> None:
    s = idle_multi
    run0 = s.submit(sleep_prompt(30, 300), headers=H[0])["prompt_id"]
    run1 = s.submit(sleep_prompt(30, 300), headers=H[1])["prompt_id"]
    wait0 = s.submit(sleep_prompt(0.05, 1), headers=H[0])["prompt_id"]
    wait1a = s.submit(sleep_prompt(0.05, 1), headers=H[1])["prompt_id"]
    wait1b = s.submit(sleep_prompt(0.05, 1), headers=H[1])["prompt_id"]
    s.wait_running(run0)
    s.wait_running(run1)

    def ids(view: dict) -> tuple[set, set]:
        return {x[1] for x in view["queue_running"]}, {x[1] for x in view["queue_pending"]}

    assert ids(s.get("/queue", headers=H[0]).json()) == ({run0}, {wait0})
    assert ids(s.get("/gpu1/queue").json()) == ({run1}, {wait1a, wait1b})
    assert ids(s.get("/queue", base=s.entry_url(2)).json()) == (set(), set())
    assert ids(s.get("/queue").json()) == ({run0, run1}, {wait0, wait1a, wait1b})
    assert s.get("/prompt", headers=H[1]).json()["exec_info"]["queue_remaining"] == 3
    assert s.get("/prompt").json()["exec_info"]["queue_remaining"] == 5

    # delete on device 0 cannot reach device 1's prompt
    assert s.post("/queue", {"delete": [wait1a]}, headers=H[0]).status == 200
    assert ids(s.get("/gpu1/queue").json())[1] == {wait1a, wait1b}
    assert s.post("/queue", {"delete": [wait1a]}, headers=H[1]).status == 200
    assert ids(s.get("/gpu1/queue").json())[1] == {wait1b}
    # clear on device 1 leaves device 0's pending prompt
    assert s.post("/queue", {"clear": True}, headers=H[1]).status == 200
    assert ids(s.get("/queue").json()) == ({run0, run1}, {wait0})

    # interrupt by prompt id stops only the worker running it
    t0 = time.time()
    assert s.post("/interrupt", {"prompt_id": run1}).status == 200
    entry1 = s.wait_history(run1, timeout=10)
    assert entry1["status"]["status_str"] == "error"
    assert time.time() - t0 < 5
    assert ids(s.get("/queue", headers=H[0]).json())[0] == {run0}

    # a targeted interrupt with no prompt id stops that device only
    run2 = s.submit(sleep_prompt(30, 300), headers=H[2])["prompt_id"]
    s.wait_running(run2)
    assert s.post("/interrupt", headers=H[2]).status == 200
    assert s.wait_history(run2, timeout=10)["status"]["status_str"] == "error"
    assert ids(s.get("/queue", headers=H[0]).json())[0] == {run0}

    # an interrupt naming a prompt on another device than the target stops nothing
    assert s.post("/interrupt", {"prompt_id": run0}, headers=H[1]).status == 200
    time.sleep(0.5)
    assert ids(s.get("/queue", headers=H[0]).json())[0] == {run0}

    # untargeted interrupt stops everything that runs
    assert s.post("/interrupt").status == 200
    assert s.wait_history(run0, timeout=10)["status"]["status_str"] == "error"
    assert s.wait_history(wait0)["status"]["status_str"] == "success"
    assert wait1a not in s.get("/history").json() and wait1b not in s.get("/history").json()


def test_untargeted_interrupt_stops_all_running(idle_multi: Server) -> None:
    s = idle_multi
    runs = [s.submit(sleep_prompt(30, 300), headers=H[i])["prompt_id"] for i in range(3)]
    for p in runs:
        s.wait_running(p)
    assert s.post("/api/interrupt").status == 200
    for p in runs:
        assert s.wait_history(p, timeout=10)["status"]["status_str"] == "error"


def test_interrupted_device_keeps_serving_and_others_unaffected(idle_multi: Server) -> None:
    s = idle_multi
    long0 = s.submit(sleep_prompt(30, 300), headers=H[0])["prompt_id"]
    s.wait_running(long0)
    assert s.post("/interrupt", headers=H[0]).status == 200
    s.wait_history(long0, timeout=10)
    # a prompt starting on device 1 must not clear device 0's flag, and device 0's flag must not hit device 1
    a = s.submit(sleep_prompt(0.5, 5), headers=H[0])["prompt_id"]
    b = s.submit(sleep_prompt(0.5, 5), headers=H[1])["prompt_id"]
    assert s.wait_history(a)["status"]["status_str"] == "success"
    assert s.wait_history(b)["status"]["status_str"] == "success"


def test_free_is_scoped(idle_multi: Server) -> None:
    # Acceptance of the flags only; that /free unloads models of the targeted device alone is checked with a real
    # checkpoint in test_diffusion.py.
    assert idle_multi.post("/free", {"unload_models": True}, headers=H[1]).status == 200
    assert idle_multi.post("/gpu2/free", {"free_memory": True}).status == 200
    assert idle_multi.post("/free", {"unload_models": True}, headers={"X-TARGET-GPU": "5"}).status == 400
    p = idle_multi.submit(sleep_prompt(0.05, 1), headers=H[1])["prompt_id"]
    assert idle_multi.wait_history(p)["status"]["status_str"] == "success"


def _save_prompt(color: int) -> dict:
    return {"1": {"class_type": "EmptyImage", "inputs": {"width": 768, "height": 768, "batch_size": 2,
                                                         "color": color}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "cp_race"}}}


def test_workers_saving_under_one_prefix_never_overwrite_each_other(idle_multi: Server) -> None:
    """ComfyUI numbers output files by listing the folder: three workers saving at once used to get one number."""
    s = idle_multi
    colors = {s.submit(_save_prompt(0x0A0B0C * (k + 1) % 0xFFFFFF), headers=H[k % 3])["prompt_id"]:
              0x0A0B0C * (k + 1) % 0xFFFFFF for k in range(24)}
    owner: dict[str, str] = {}
    for prompt_id, color in colors.items():
        images = s.wait_history(prompt_id)["outputs"]["2"]["images"]
        assert len(images) == 2
        for img in images:
            assert img["filename"] not in owner, (
                f"{img['filename']} given to {owner.get(img['filename'])} and {prompt_id}")
            owner[img["filename"]] = prompt_id
            resp = s.get(f"/view?filename={img['filename']}&subfolder={img['subfolder']}&type={img['type']}")
            assert resp.status == 200
            pixel = Image.open(io.BytesIO(resp.body)).convert("RGB").getpixel((0, 0))
            assert pixel == ((color >> 16) & 0xFF, (color >> 8) & 0xFF, color & 0xFF), (img, prompt_id)
