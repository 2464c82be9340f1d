"""Drop-in mode: stock ``python main.py`` with the package installed as a custom node and the env switch."""

from __future__ import annotations

from pathlib import Path

from harness import Server, record_of, sleep_prompt


def test_dropin_switch_on_serves_two_devices(comfy_dir: Path, dropin_nodes: Path) -> None:
    server = Server(comfy_dir, mode="dropin", devices="cpu,cpu", custom_nodes=dropin_nodes,
                    env={"COMFY_NUM_GPUS": "2"}, name=f"dropin-{comfy_dir.name}").start()
    try:
        server.wait_log("multi-device mode with 2 workers")  # written by the worker start, after the listener
        assert server.get("/debug/queues").json()["queues"][1]["gpu_id"] == 1
        a = server.submit(sleep_prompt(1.5, 5), headers={"X-TARGET-GPU": "0"})
        b = server.submit(sleep_prompt(1.5, 5), path="/gpu1/prompt")
        c = server.submit(sleep_prompt(0.05, 1), base=server.entry_url(1))
        assert (a["gpu_id"], b["gpu_id"], c["gpu_id"]) == (0, 1, 1)
        ra, rb = record_of(server.wait_history(a["prompt_id"])), record_of(server.wait_history(b["prompt_id"]))
        assert ra["thread"] == "comfy-parallel-worker-0" and rb["thread"] == "comfy-parallel-worker-1"
        assert max(ra["start"], rb["start"]) < min(ra["end"], rb["end"])
        assert server.wait_history(c["prompt_id"])["gpu_id"] == 1
        assert server.post("/prompt", {"prompt": sleep_prompt()}, headers={"X-TARGET-GPU": "2"}).status == 400
    finally:
        server.stop()


def test_dropin_switch_off_is_stock(comfy_dir: Path, dropin_nodes: Path) -> None:
    server = Server(comfy_dir, mode="dropin", devices="cpu,cpu", custom_nodes=dropin_nodes,
                    env={"COMFY_MULTI_GPU_SCHED": "0"}, name=f"dropin-off-{comfy_dir.name}").start()
    try:
        server.wait_log("nothing is patched")
        assert server.get("/debug/queues").status == 404
        p = server.submit(sleep_prompt(0.05, 1), headers={"X-TARGET-GPU": "7"})  # stock ignores the header
        assert "gpu_id" not in p
        assert "gpu_id" not in server.wait_history(p["prompt_id"])
    finally:
        server.stop()
