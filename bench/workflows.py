"""A varied set of ComfyUI API-format workflows (core nodes only) for checking a server against stock ComfyUI.

Why a set and not one txt2img prompt: each kind below takes a different path through ComfyUI's sampler and model
code (sampler families, cfg 1 skipping the negative pass, non-square and batched latents, VAE encode, LoRA weight
patches, a second sampling pass at another shape, area conditioning splitting the batch), and a multi-worker
server can break one of them while plain txt2img still matches.

Every workflow ends in SaveImage node ``"9"``. ``round_tag`` appends spaces to the prompt text: ComfyUI's
tokenizer drops them (same tokens, same image) but the executor's cache key changes, so a second round re-runs
the text encoders and samplers instead of answering from the cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SAVE_NODE = "9"
POSITIVE = "a photo of a cat sitting on a wooden table"
NEGATIVE = "blurry, low quality"
AREA_TEXT = "a red ball"


@dataclass(frozen=True)
class Arch:
    """Checkpoint, LoRA and sizes of one model family (sizes in pixels, multiples of 8)."""

    name: str
    ckpt: str
    lora: str
    base: int                   # square txt2img, img2img, LoRA, area, samplers
    nonsquare: tuple[int, int]  # width, height
    hires: tuple[int, int]      # first-pass square size, second-pass square size


# Full sizes for the GPU: SD1.5 at its native 512, SDXL at 768 (its 1024 is the W2 throughput workload).
ARCHS = {
    "sd15": Arch("sd15", "sd15_rand.safetensors", "sd15_rand_lora.safetensors", 512, (640, 384), (384, 576)),
    "sdxl": Arch("sdxl", "sdxl_rand.safetensors", "sdxl_rand_lora.safetensors", 768, (960, 640), (640, 960)),
}
# CPU smoke-test sizes (ConditioningSetArea needs a width of at least 64, so the base is 128).
TINY = {
    "sd15": Arch("sd15", "sd15_rand.safetensors", "sd15_rand_lora.safetensors", 128, (128, 64), (64, 96)),
    "sdxl": Arch("sdxl", "sdxl_rand.safetensors", "sdxl_rand_lora.safetensors", 128, (128, 64), (64, 96)),
}

KINDS = ("euler", "dpmpp_2m_karras", "uni_pc", "euler_ancestral", "nonsquare", "batch2", "cfg1", "img2img", "lora",
         "hires", "area")


def input_image_name(size: int) -> str:
    return f"gpucheck_in_{size}.png"


def write_input_images(input_dir: Path, sizes: set[int]) -> list[Path]:
    """Deterministic RGB test images (gradients plus seeded noise) for the img2img kind, one per square size."""
    import numpy as np
    from PIL import Image

    input_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for size in sorted(sizes):
        rng = np.random.default_rng(size)
        ramp = np.linspace(0, 255, size, dtype=np.float32)
        img = np.stack([np.add.outer(ramp, ramp) / 2, np.tile(ramp, (size, 1)), np.tile(ramp[:, None], (1, size))],
                       axis=-1)
        img = np.clip(img + rng.normal(0, 24, img.shape), 0, 255).astype(np.uint8)
        path = input_dir / input_image_name(size)
        Image.fromarray(img, "RGB").save(path)
        written.append(path)
    return written


def _sampler(seed: int, steps: int, cfg: float, sampler: str, scheduler: str, denoise: float, model: list,
             positive: list, negative: list, latent: list) -> dict:
    return {"class_type": "KSampler", "inputs": {
        "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": sampler, "scheduler": scheduler, "denoise": denoise,
        "model": model, "positive": positive, "negative": negative, "latent_image": latent}}


def txt2img(ckpt: str, width: int, height: int, steps: int, seed: int, prefix: str, round_tag: int = 0,
            sampler: str = "euler", scheduler: str = "normal", cfg: float = 7.0, batch: int = 1) -> dict:
    """Plain txt2img: the W1/W2 throughput prompt (512x512 / 1024x1024, 20 steps, euler, cfg 7, batch 1)."""
    pad = " " * round_tag
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": POSITIVE + pad, "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": NEGATIVE + pad, "clip": ["4", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": width, "height": height, "batch_size": batch}},
        "3": _sampler(seed, steps, cfg, sampler, scheduler, 1.0, ["4", 0], ["6", 0], ["7", 0], ["5", 0]),
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        SAVE_NODE: {"class_type": "SaveImage", "inputs": {"filename_prefix": prefix, "images": ["8", 0]}},
    }


def build(kind: str, arch: Arch, steps: int, seed: int, prefix: str, round_tag: int = 0) -> dict:
    """The API-format prompt of one kind for one model family."""
    s = arch.base
    if kind == "euler":
        return txt2img(arch.ckpt, s, s, steps, seed, prefix, round_tag)
    if kind == "dpmpp_2m_karras":
        return txt2img(arch.ckpt, s, s, steps, seed, prefix, round_tag, sampler="dpmpp_2m", scheduler="karras")
    if kind == "uni_pc":
        return txt2img(arch.ckpt, s, s, steps, seed, prefix, round_tag, sampler="uni_pc")
    if kind == "euler_ancestral":
        return txt2img(arch.ckpt, s, s, steps, seed, prefix, round_tag, sampler="euler_ancestral")
    if kind == "nonsquare":
        return txt2img(arch.ckpt, *arch.nonsquare, steps, seed, prefix, round_tag)
    if kind == "batch2":
        return txt2img(arch.ckpt, s, s, steps, seed, prefix, round_tag, batch=2)
    if kind == "cfg1":
        return txt2img(arch.ckpt, s, s, steps, seed, prefix, round_tag, cfg=1.0)

    wf = txt2img(arch.ckpt, s, s, steps, seed, prefix, round_tag)
    if kind == "img2img":
        wf["10"] = {"class_type": "LoadImage", "inputs": {"image": input_image_name(s)}}
        wf["11"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["10", 0], "vae": ["4", 2]}}
        wf["3"]["inputs"].update(latent_image=["11", 0], denoise=0.6)
        del wf["5"]
    elif kind == "lora":
        wf["10"] = {"class_type": "LoraLoader", "inputs": {"model": ["4", 0], "clip": ["4", 1], "lora_name": arch.lora,
                                                           "strength_model": 0.8, "strength_clip": 0.8}}
        wf["3"]["inputs"]["model"] = ["10", 0]
        wf["6"]["inputs"]["clip"] = ["10", 1]
        wf["7"]["inputs"]["clip"] = ["10", 1]
    elif kind == "hires":
        first, second = arch.hires
        wf["5"]["inputs"].update(width=first, height=first)
        wf["10"] = {"class_type": "LatentUpscale", "inputs": {"samples": ["3", 0], "upscale_method": "nearest-exact",
                                                              "width": second, "height": second, "crop": "disabled"}}
        wf["11"] = _sampler(seed, steps, 7.0, "euler", "normal", 0.5, ["4", 0], ["6", 0], ["7", 0], ["10", 0])
        wf["8"]["inputs"]["samples"] = ["11", 0]
    elif kind == "area":
        wf["10"] = {"class_type": "CLIPTextEncode", "inputs": {"text": AREA_TEXT + " " * round_tag, "clip": ["4", 1]}}
        wf["11"] = {"class_type": "ConditioningSetArea", "inputs": {"conditioning": ["10", 0], "width": s // 2,
                                                                    "height": s, "x": 0, "y": 0, "strength": 1.0}}
        wf["12"] = {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["6", 0],
                                                                    "conditioning_2": ["11", 0]}}
        wf["3"]["inputs"]["positive"] = ["12", 0]
    else:
        raise ValueError(f"unknown workflow kind {kind!r}; known: {', '.join(KINDS)}")
    return wf


@dataclass(frozen=True)
class Case:
    """One prompt of the identity set: its kind, model family and seed (the same seed in every round)."""

    kind: str
    arch: str
    seed: int

    @property
    def key(self) -> str:
        return f"{self.arch}/{self.kind}"


def identity_set(archs: list[str], kinds: tuple[str, ...] = KINDS) -> list[Case]:
    """Every kind for every model family, a fixed seed per kind (seeds differ between kinds, and a kind keeps its
    seed whichever subset is run)."""
    return [Case(kind, arch, 101 + KINDS.index(kind)) for arch in archs for kind in kinds]
