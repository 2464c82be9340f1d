"""Shared weights on CPU workers: one disk read per file, host copies never written, outputs as stock.

Two workers run the same random SD1.5-shaped checkpoint with two different random LoRAs at the same time, then
swapped; stock ComfyUI runs each LoRA alone. The images must match stock's, the checkpoint and each LoRA must
have been read from disk once (counted by the test node pack, which wraps ``comfy.utils.load_torch_file``), and
the host copies must hash the same before and after the LoRA runs.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from harness import REPO, Server
from test_diffusion import _image, _pixels, sd15_models, txt2img  # noqa: F401  (sd15_models is a fixture)

CKPT = "sd15-rand.safetensors"


@pytest.fixture(scope="session")
def lora_dir(sd15_models: Path) -> Path:  # noqa: F811
    loras = sd15_models / "loras"
    loras.mkdir(exist_ok=True)
    for seed in (1, 2):
        out = loras / f"lora{seed}.safetensors"
        if not out.exists():
            subprocess.run([sys.executable, str(REPO / "tools" / "make_rand_lora.py"), str(sd15_models / CKPT),
                            str(out), str(seed)], check=True, timeout=120)
    return loras


def lora_workflow(seed: int, lora: str) -> dict:
    wf = txt2img(seed)
    wf["10"] = {"class_type": "LoraLoader", "inputs": {"model": ["4", 0], "clip": ["4", 1], "lora_name": lora,
                                                        "strength_model": 1.0, "strength_clip": 1.0}}
    wf["3"]["inputs"]["model"] = ["10", 0]
    wf["6"]["inputs"]["clip"] = ["10", 1]
    wf["7"]["inputs"]["clip"] = ["10", 1]
    wf["9"]["inputs"]["filename_prefix"] = f"cp-{lora}"
    return wf


def _run(server: Server, jobs: list[tuple[str, dict]]) -> list[np.ndarray]:
    """Submit every (target, workflow) at once, wait for all; the images in order."""
    ids = []
    for target, wf in jobs:
        headers = {"X-TARGET-GPU": target} if target else None
        ids.append(server.submit(wf, headers=headers)["prompt_id"])
    images = []
    for pid in ids:
        entry = server.wait_history(pid, timeout=400)
        assert entry["status"]["status_str"] == "success", entry["status"]
        images.append(_pixels(_image(server, entry)))
    return images


def _weights(server: Server) -> dict:
    return server.get("/multigpu/status").json()["weights"]


def _entry(weights: dict, prefix: str) -> dict:
    return next(e for e in weights["entries"] if e["name"].startswith(prefix))


WF_A, WF_B = lora_workflow(11, "lora1.safetensors"), lora_workflow(11, "lora2.safetensors")


@pytest.fixture(scope="session")
def stock_lora_images(comfy_dir: Path, sd15_models: Path, lora_dir: Path) -> tuple[np.ndarray, np.ndarray]:  # noqa: F811
    """Stock ComfyUI's image for each of the two LoRAs, each run alone."""
    stock = Server(comfy_dir, mode="stock", name=f"sw-stock-{comfy_dir.name}", models_dir=sd15_models,
                   model_paths={"loras": lora_dir}, entry_ports=False).start()
    try:
        stock_a, stock_b = _run(stock, [("", WF_A)])[0], _run(stock, [("", WF_B)])[0]
    finally:
        stock.stop()
    # the two LoRAs must matter, or the comparisons with these images prove nothing
    assert np.abs(stock_a - stock_b).mean() > 5, np.abs(stock_a - stock_b).mean()
    return stock_a, stock_b


@pytest.mark.parametrize("host_copy", ["ram", "page-cache"])
def test_two_workers_one_host_copy_different_loras_match_stock(comfy_dir: Path, sd15_models: Path,  # noqa: F811
                                                               lora_dir: Path, stock_lora_images: tuple,
                                                               host_copy: str) -> None:
    wf_a, wf_b = WF_A, WF_B
    stock_a, stock_b = stock_lora_images
    server = Server(comfy_dir, mode="multi", devices="cpu,cpu", name=f"sw-multi-{host_copy}-{comfy_dir.name}",
                    models_dir=sd15_models, model_paths={"loras": lora_dir}, entry_ports=False,
                    serve_args=["--host-copy", host_copy]).start()
    try:
        a0, b1 = _run(server, [("0", wf_a), ("1", wf_b)])
        digest_before = server.get("/cp_test/host_digest").json()
        b0, a1 = _run(server, [("0", wf_b), ("1", wf_a)])
        digest_after = server.get("/cp_test/host_digest").json()

        # the same image as stock ComfyUI for each LoRA, whichever worker ran it and whatever ran beside it
        for got, want in ((a0, stock_a), (a1, stock_a), (b0, stock_b), (b1, stock_b)):
            assert np.abs(got - want).max() <= 2, np.abs(got - want).max()

        # one read per file for both workers
        counts = server.get("/cp_test/load_counts").json()
        by_name = {Path(path).name: n for path, n in counts.items()}
        assert by_name == {CKPT: 1, "lora1.safetensors": 1, "lora2.safetensors": 1}, counts

        # the host copies were never written: LoRAs went to the device copies only
        assert digest_before and digest_before == digest_after

        weights = _weights(server)
        ckpt = _entry(weights, "load_checkpoint_guess_config")
        assert weights["disk_loads"] == 3 and weights["shared"] is True
        assert ckpt["views"] == [0, 1] and ckpt["devices_loaded"] == [0, 1], ckpt
        assert ckpt["host_bytes"] > 1 << 30 and ckpt["pinned"] is False  # CPU-only: nothing to pin for
        assert weights["host_copy"] == host_copy
        if host_copy == "page-cache":
            # ComfyUI keeps CLIP in the file's fp16 on the CPU (the UNet and VAE become fp32 copies): at least the
            # text encoder (235 MiB) is the file's own pages, and LoRAs on it still went to the device copies
            assert ckpt["page_cache_bytes"] > 200 << 20, ckpt
        else:
            assert ckpt["page_cache_bytes"] == 0, ckpt

        # /free on one device unloads only that device's copy; the host copy stays for the other
        assert server.post("/free", {"unload_models": True}, headers={"X-TARGET-GPU": "0"}).status == 200
        deadline = time.time() + 30
        while time.time() < deadline and _entry(_weights(server), "load_checkpoint")["devices_loaded"] != [1]:
            time.sleep(0.2)
        after = _entry(_weights(server), "load_checkpoint")
        assert after["devices_loaded"] == [1] and after["host_bytes"] == ckpt["host_bytes"], after
    finally:
        server.stop()
