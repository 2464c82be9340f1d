"""The ComfyUI adapter: every patch applies to a real ComfyUI, twice is a no-op, undo restores everything,
and a ComfyUI without a patch point fails at start with the list of patches that do not apply."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from harness import REPO

PROBE = Path(__file__).with_name("adapter_probe.py")


def probe(comfy_dir: Path, *extra: str) -> dict:
    out = subprocess.run([sys.executable, str(PROBE), str(comfy_dir), *extra], cwd=str(REPO), capture_output=True,
                         text=True, timeout=180, env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_patches_apply_are_idempotent_and_undo(comfy_dir: Path) -> None:
    result = probe(comfy_dir)
    assert result["version"] == comfy_dir.name
    assert result["cuda_malloc_warning_ok"] is True
    assert set(result["applied"]) == {
        "server-worker-attrs", "progress-registry-per-worker", "progress-state-to-submitter",
        "seeded-generator-per-call", "attention-priority-atomic", "interrupt-per-worker", "loaded-models-per-worker",
        "empty-cache-per-device", "unique-save-counters", "device-workers", "server-setup", "entry-ports",
        "scoped-queue-status",
        "websocket-send-per-client", "quiet-retried-attempt",
        "host-load-on-cpu", "host-weights-read-only", "view-bulk-load", "shared-model-loaders",
        "cuda-graphs", "devices-per-worker", "ram-release-per-worker", "gc-once-per-interval", "patch-switch-in-place",
        "count-model-loads", "device-in-execution-start", "worker-vram-limit"}
    for name in ("comfy.model_management.current_loaded_models", "comfy.model_management.soft_empty_cache",
                 "execution.get_progress_state", "main.get_progress_state", "main.prompt_worker", "main.gc",
                 "PromptServer.client_id", "PromptServer.add_routes", "server.send_socket_catch_exception",
                 "PromptServer.send_sync", "comfy.sd.load_checkpoint_guess_config", "comfy.sd.load_clip",
                 "comfy.controlnet.load_controlnet", "comfy.utils.copy_to_param", "VAELoader.load_vae",
                 "LoraLoader.load_lora", "comfy.model_management.unet_inital_load_device", "UNetModel.forward",
                 "ModelPatcher.load", "ModelPatcher.unpatch_model", "ModelPatcher.partially_load",
                 "folder_paths.get_save_image_path", "SaveImage.save_images",
                 "comfy.ops.scaled_dot_product_attention", "torch.nn.functional.scaled_dot_product_attention",
                 "comfy.model_management.get_free_memory", "LoadedModel.model_load", "PromptExecutor.add_message"):
        assert name in result["changed"], name
    assert result["loaded_models_type"] == "PerWorkerList"
    assert result["execution_sees_patch"] is True
    assert result["noise_is_private_and_stock_equal"] is True
    assert result["host_copy_on_write"] is True
    assert result["interrupt"] == {"stale_dropped": True, "kept_through_start": True, "later_clear_clears": True}
    memory_management = comfy_dir / "comfy" / "memory_management.py"
    has_ram_hook = memory_management.exists() and "set_ram_cache_release_state" in memory_management.read_text()
    assert result["ram_release_per_worker"] == (True if has_ram_hook else "n/a")  # 0.33 has the hook, 0.3.75 not
    # a small attention call never runs inside another worker's large one (the backend order stays torch's)
    assert result["attention"]["ok"] is True, result["attention"]
    # a LoRA switch on a device: same weights as ComfyUI's own switch, written where the weights are (stock puts a
    # new tensor in place of each patched weight; graphs keyed by weight addresses survive only the in-place way)
    switch = result["patch_switch"]
    assert switch["stock"]["lora_applied"] and switch["stock"]["plain_restored"], switch
    assert switch["stock"]["moved_while_patched"] is True, switch
    assert switch["patched"] == {"lora_applied": True, "plain_restored": True, "moved_while_patched": False,
                                 "moved_after": False}, switch
    assert result["second_apply_is_noop"] is True
    assert result["restored"] is True, result["not_restored"]
    assert result["loaded_models_type_after"] == "list"


def test_missing_patch_point_fails_loudly_and_changes_nothing(comfy_dir: Path) -> None:
    result = probe(comfy_dir, "break")
    error = result["error"]
    assert "These patches do not fit" in error
    assert "empty-cache-per-device" in error and "entry-ports" in error
    # signatures and contracts, not only names: a third prompt_worker argument (0.38), a new queue method
    assert "device-workers: main.prompt_worker takes (q, server_instance, asset_manager)" in error
    assert "server-setup: execution.PromptQueue has cancel_everything, which DeviceQueues lacks" in error
    assert "COMFY_MULTI_GPU_SCHED=0" in error
    assert result["unchanged_after_error"] is True


def test_unchecked_version_is_refused_unless_allowed(comfy_dir: Path) -> None:
    result = probe(comfy_dir, "unchecked")
    refused = result["refused"]
    assert refused and "ComfyUI 0.99.0 is not a version comfy-parallel was checked on (0.3.75, 0.33.0)" in refused
    assert "--allow-unchecked-comfyui" in refused and "Every patch check passed" in refused
    # with the user's consent and every check passing it applies, and is undone like any other start
    assert "error" not in result and "devices-per-worker" in result["applied"]
    assert result["restored"] is True, result["not_restored"]
