"""Run in a subprocess by test_adapter.py: import a real ComfyUI, patch it, undo, and report what happened.

usage: python adapter_probe.py COMFYUI_DIR [break | unchecked]
"""

from __future__ import annotations

import json
import sys


class Hooks:
    def __init__(self) -> None:
        from comfy_parallel.weights.store import WeightStore

        from comfy_parallel.settings import Settings, parse_devices

        self.weight_store = WeightStore(pin="off")  # turns the shared-weights patches on
        # and the CUDA graph and VRAM limit patches
        self.settings = Settings(devices=parse_devices("cpu,cpu"), cuda_graphs="on", worker_vram_limit=1 << 30)

    def before_routes(self, ps):  # pragma: no cover - never called, nothing is started
        raise AssertionError

    after_routes = start_workers = listen_addresses = queue_updated = before_routes


def snapshot(comfy) -> dict:
    """Identity of every attribute the patches may touch, in every module that holds it."""
    mm, progress, server, main = comfy.model_management, comfy.progress, comfy.server, comfy.main
    names = {
        (mm, "current_loaded_models"), (mm, "soft_empty_cache"), (mm, "interrupt_current_processing"),
        (mm, "processing_interrupted"), (mm, "throw_exception_if_processing_interrupted"),
        (progress, "get_progress_state"), (progress, "reset_progress_state"),
        (comfy.execution, "get_progress_state"), (comfy.execution, "reset_progress_state"),
        (main, "get_progress_state"), (main, "prompt_worker"), (main, "gc"), (server, "send_socket_catch_exception"),
    }
    sd, controlnet, utils = (sys.modules[n] for n in ("comfy.sd", "comfy.controlnet", "comfy.utils"))
    names |= {(sd, "load_checkpoint_guess_config"), (sd, "load_diffusion_model"), (sd, "load_clip"),
              (controlnet, "load_controlnet"), (mm, "unet_inital_load_device"), (mm, "text_encoder_initial_device"),
              (mm, "load_models_gpu"), (utils, "copy_to_param"), (mm, "get_free_memory")}
    unet = sys.modules["comfy.ldm.modules.diffusionmodules.openaimodel"].UNetModel
    patcher = sys.modules["comfy.model_patcher"].ModelPatcher
    out = {f"{mod.__name__}.{attr}": id(getattr(mod, attr)) for mod, attr in names if hasattr(mod, attr)}
    out["folder_paths.get_save_image_path"] = id(sys.modules["folder_paths"].get_save_image_path)
    out["nodes.get_save_image_path"] = id(comfy.nodes.folder_paths.get_save_image_path)
    out["SaveImage.save_images"] = id(comfy.nodes.SaveImage.__dict__["save_images"])
    out["VAELoader.load_vae"] = id(comfy.nodes.VAELoader.__dict__["load_vae"])
    out["LoraLoader.load_lora"] = id(comfy.nodes.LoraLoader.__dict__["load_lora"])
    out["UNetModel.forward"] = id(unet.__dict__["forward"])
    for attr in ("load", "unpatch_model", "partially_unload", "partially_load"):
        out[f"ModelPatcher.{attr}"] = id(patcher.__dict__[attr])
    out["LoadedModel.model_load"] = id(mm.LoadedModel.__dict__["model_load"])
    out["PromptExecutor.add_message"] = id(comfy.execution.PromptExecutor.__dict__["add_message"])
    import torch

    out["torch.manual_seed"] = id(torch.manual_seed)
    out["comfy.ops.scaled_dot_product_attention"] = id(sys.modules["comfy.ops"].scaled_dot_product_attention)
    out["torch.nn.functional.scaled_dot_product_attention"] = id(torch.nn.functional.scaled_dot_product_attention)
    handler = progress.WebUIProgressHandler
    out["WebUIProgressHandler._send_progress_state"] = id(handler.__dict__["_send_progress_state"])
    for attr in ("client_id", "last_node_id", "last_prompt_id", "add_routes", "start_multi_address",
                 "queue_updated", "send_sync"):
        out[f"PromptServer.{attr}"] = id(server.PromptServer.__dict__.get(attr))
    return out


def noise_check(comfy) -> bool:
    """In a worker, prepare_noise(seed) must equal stock's noise even if another thread draws in between."""
    import threading

    import comfy.sample
    import torch

    from comfy_parallel.scheduling import worker_context
    from comfy_parallel.settings import DeviceSpec

    latent = torch.zeros(1, 4, 8, 8)
    reference = torch.randn(latent.size(), generator=torch.Generator().manual_seed(42))
    out: dict = {}

    def worker() -> None:
        worker_context.bind(worker_context.WorkerContext(DeviceSpec(0, "cpu")))
        generator = torch.manual_seed(42)
        torch.randn(1000)  # another worker drawing from the global generator at this moment
        out["noise"] = torch.randn(latent.size(), generator=generator)
        out["prepared"] = comfy.sample.prepare_noise(latent, 42)

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    return bool(torch.equal(out["noise"], reference) and torch.equal(out["prepared"], reference))


def interrupt_check(comfy) -> dict:
    """An interrupt sent after a worker took a prompt (a client saw it running) survives the executor's clear as it
    starts the prompt (``execute``: ``nodes.interrupt_processing(False)``); one sent before the worker took it is
    dropped, as stock drops it."""
    import threading

    from comfy_parallel.scheduling import worker_context
    from comfy_parallel.settings import DeviceSpec

    mm = comfy.model_management
    taken, sent, out = threading.Event(), threading.Event(), {}

    def worker() -> None:
        ctx = worker_context.WorkerContext(DeviceSpec(0, "cpu"))
        worker_context.bind(ctx)
        comfy.nodes.interrupt_processing(True)  # stale: sent while no prompt ran
        ctx.begin_prompt()
        out["stale_dropped"] = not mm.processing_interrupted()
        taken.set()
        sent.wait(30)
        comfy.nodes.interrupt_processing(False)  # the executor starting the prompt
        out["kept_through_start"] = mm.processing_interrupted()
        comfy.nodes.interrupt_processing(False)  # any later clear clears
        out["later_clear_clears"] = not mm.processing_interrupted()

    t = threading.Thread(target=worker)
    t.start()
    taken.wait(30)
    comfy.nodes.interrupt_processing(True)  # POST /interrupt on the event loop: every worker, as stock
    sent.set()
    t.join()
    mm.interrupt_current_processing(False)
    return out


def copy_on_write_check() -> bool:
    """An in-place weight update (comfy.utils.copy_to_param) on a view leaves the shared host tensor as it was."""
    import torch

    import comfy.utils
    from comfy_parallel.weights import store as weights

    host = torch.nn.Linear(4, 4)
    weights.seal_host_modules([host])
    view = weights.make_view(host, [host])
    before = host.weight.detach().clone()
    comfy.utils.copy_to_param(view, "weight", torch.full((4, 4), 7.0))
    plain = torch.nn.Linear(4, 4)
    comfy.utils.copy_to_param(plain, "weight", torch.full((4, 4), 7.0))  # not a host tensor: in place, as stock
    return (torch.equal(host.weight, before) and bool(torch.all(view.weight == 7.0))
            and bool(torch.all(plain.weight == 7.0)))


def ram_release_check() -> bool | str:
    """0.33: each worker registers and calls its own RAM-pressure release; the headroom is the largest running."""
    import threading

    mem = sys.modules.get("comfy.memory_management")
    if mem is None or not hasattr(mem, "set_ram_cache_release_state"):
        return "n/a"
    from comfy_parallel.scheduling import worker_context
    from comfy_parallel.settings import DeviceSpec

    calls: list[tuple[int, int]] = []
    both_set, headrooms = threading.Barrier(2), {}

    def worker(index: int, headroom: int) -> None:
        worker_context.bind(worker_context.WorkerContext(DeviceSpec(index, "cpu")))
        mem.set_ram_cache_release_state(lambda target, free_active=False: calls.append((index, target)) or index,
                                        headroom)
        both_set.wait()
        headrooms[index] = mem.RAM_CACHE_HEADROOM
        assert mem.extra_ram_release(100 + index) == index
        both_set.wait()
        mem.set_ram_cache_release_state(None, 0)

    threads = [threading.Thread(target=worker, args=(i, h)) for i, h in ((0, 5), (1, 9))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sorted(calls) == [(0, 100), (1, 101)] and headrooms == {0: 9, 1: 9} and mem.RAM_CACHE_HEADROOM == 0


def attention_check(comfy) -> dict:
    """A small CUDA attention call made while another worker is inside a large one sees torch's own backend order.

    ComfyUI's CUDA branch (0.3.75-0.38, comfy/ops.py) cannot run on CPU, so a stand-in does what it does with the
    real torch flags: a large call sets ComfyUI's priority with sdpa_kernel(..., set_priority=True) and restores
    it after; a small call runs under whatever order stands. Worker A stays inside a large call until worker B's
    small call has run or 1 s has passed; with the patch B waits for A (so B cannot come in and A's wait ends at
    its bound), without it B runs inside A's window and sees ComfyUI's order.
    """
    import threading

    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from comfy_parallel.comfy_adapter.attention import AttentionPriorityAtomic

    ops = sys.modules["comfy.ops"]
    comfy_order = [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                   SDPBackend.MATH]
    default = list(torch._C._get_sdp_priority_order())
    a_inside, b_ran, seen = threading.Event(), threading.Event(), {}

    class Query:  # what the patch and ComfyUI's wrapper look at: the device and the size
        def __init__(self, n: int) -> None:
            self.n, self.is_cuda = n, True

        def nelement(self) -> int:
            return self.n

    def cuda_branch(q, k, v, *args, **kwargs):
        if q.nelement() < 1024 * 128:
            seen["small_call_order"] = list(torch._C._get_sdp_priority_order())
            b_ran.set()
            return None
        with sdpa_kernel(comfy_order, set_priority=True):
            a_inside.set()
            b_ran.wait(1.0)
        return None

    original = ops.scaled_dot_product_attention
    ops.scaled_dot_product_attention = cuda_branch
    patch = AttentionPriorityAtomic()
    try:
        patch.apply(comfy)
        large = threading.Thread(target=lambda: ops.scaled_dot_product_attention(Query(1 << 20), None, None))
        large.start()
        a_inside.wait(30)
        ops.scaled_dot_product_attention(Query(16), None, None)
        large.join()
        seen["order_after"] = list(torch._C._get_sdp_priority_order())
    finally:
        patch.undo()
        seen["restored"] = ops.scaled_dot_product_attention is cuda_branch
        ops.scaled_dot_product_attention = original
    return {"ok": seen.get("small_call_order") == default and seen.get("order_after") == default
            and seen["restored"], **seen, "default": default}


def patch_switch_check(comfy) -> dict:
    """Plain -> LoRA clone -> plain on one model, as ComfyUI's load_models_gpu does it (partially_load), with and
    without patch-switch-in-place. The patch acts on GPU loads only; here the CPU stands in for the device."""
    import torch
    import comfy.model_patcher as mp
    from comfy_parallel.comfy_adapter import model_patcher
    from comfy_parallel.comfy_adapter.model_patcher import PatchSwitchInPlace

    def run() -> dict:
        base = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
        plain = mp.ModelPatcher(base, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
        lora = plain.clone()
        lora.add_patches({"0.weight": (torch.ones(4, 4),)}, 1.0)
        plain.partially_load(torch.device("cpu"), 1 << 30)
        w0, address = base[0].weight.detach().clone(), base[0].weight.data_ptr()
        lora.partially_load(torch.device("cpu"), 1 << 30)
        patched = torch.equal(base[0].weight.detach(), w0 + 1)
        moved = base[0].weight.data_ptr() != address
        plain.partially_load(torch.device("cpu"), 1 << 30)
        return {"lora_applied": patched, "plain_restored": torch.equal(base[0].weight.detach(), w0),
                "moved_while_patched": moved, "moved_after": base[0].weight.data_ptr() != address}

    stock = run()
    patch = PatchSwitchInPlace()
    real = model_patcher.on_device
    model_patcher.on_device = lambda device_to: device_to is not None
    try:
        patch.apply(comfy)
        patched = run()
    finally:
        patch.undo()
        model_patcher.on_device = real
    return {"stock": stock, "patched": patched}


def main() -> None:
    comfy_dir = sys.argv[1]
    mode = sys.argv[2] if len(sys.argv) > 2 else ""
    breaking = mode == "break"
    from comfy_parallel.comfy_adapter import Adapter, AdapterError, Comfy, load_comfyui

    main_module = load_comfyui(comfy_dir, ["--cpu", "--disable-all-custom-nodes"])
    comfy = Comfy.from_sys_modules()
    result: dict = {"version": comfy.version}
    # On CUDA, start_comfyui calls cuda_malloc_warning(), which reads main's ``cuda_malloc`` global.
    mm = comfy.model_management
    real_name = mm.get_torch_device_name
    mm.get_torch_device_name = lambda device: "cuda:0 NVIDIA H100 80GB HBM3 : cudaMallocAsync"
    try:
        main_module.cuda_malloc_warning()
        result["cuda_malloc_warning_ok"] = True
    except Exception as err:  # reported, not raised: the test names what broke
        result["cuda_malloc_warning_ok"] = repr(err)
    finally:
        mm.get_torch_device_name = real_name
    if breaking:
        del comfy.model_management.soft_empty_cache  # as if a newer ComfyUI had renamed it
        comfy.server.PromptServer.start_multi_address = None

        def prompt_worker(q, server_instance, asset_manager):  # 0.38's signature: a third argument
            server_instance.last_prompt_id = None
            server_instance.send_sync(None, None)
            q.task_done(None, None)

        comfy.main.prompt_worker = prompt_worker
        comfy.execution.PromptQueue.cancel_everything = lambda self: None  # a queue method DeviceQueues lacks
    if mode == "unchecked":
        comfy.version = "0.99.0"
        try:
            Adapter(comfy, Hooks()).apply()
            result["refused"] = None
        except AdapterError as err:
            result["refused"] = str(err)
    before = snapshot(comfy)
    adapter = Adapter(comfy, Hooks(), allow_unchecked=mode == "unchecked")
    try:
        adapter.apply()
    except AdapterError as err:
        result["error"] = str(err)
        result["unchanged_after_error"] = snapshot(comfy) == before
        print(json.dumps(result))
        return
    patched = snapshot(comfy)
    result["changed"] = sorted(k for k in before if before[k] != patched[k])
    result["applied"] = adapter.applied
    again = Adapter(comfy, Hooks()).apply()
    result["second_apply_is_noop"] = again is adapter and snapshot(comfy) == patched
    import comfy.model_management as mm
    import execution

    result["loaded_models_type"] = type(mm.current_loaded_models).__name__
    result["execution_sees_patch"] = execution.get_progress_state is comfy.progress.get_progress_state
    result["noise_is_private_and_stock_equal"] = noise_check(comfy)
    result["host_copy_on_write"] = copy_on_write_check()
    result["interrupt"] = interrupt_check(comfy)
    result["ram_release_per_worker"] = ram_release_check()
    result["attention"] = attention_check(comfy)
    adapter.undo()
    after = snapshot(comfy)
    result["restored"] = after == before
    result["not_restored"] = sorted(k for k in before if before[k] != after[k])
    result["loaded_models_type_after"] = type(mm.current_loaded_models).__name__
    result["patch_switch"] = patch_switch_check(comfy)  # on stock ComfyUI again, this patch alone
    print(json.dumps(result))


if __name__ == "__main__":
    main()
