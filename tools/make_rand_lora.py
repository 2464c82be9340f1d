"""Write a random LoRA for a checkpoint's UNet: ``python make_rand_lora.py CKPT OUT SEED [N_LAYERS] [RANK]``.

Keys follow ComfyUI's ``lora_unet_<ldm key with _>`` naming (comfy.lora.model_lora_keys_unet), shapes are read from
the checkpoint's own header, so the LoRA applies to exactly that checkpoint. No downloads; deterministic by seed.
"""

from __future__ import annotations

import sys

import torch
from safetensors import safe_open
from safetensors.torch import save_file

PREFIX = "model.diffusion_model."


def attention_weights(ckpt: str) -> dict[str, tuple[int, int]]:
    shapes: dict[str, tuple[int, int]] = {}
    with safe_open(ckpt, framework="pt") as f:
        for key in f.keys():
            if key.startswith(PREFIX) and key.endswith(("attn1.to_q.weight", "attn2.to_v.weight", "attn1.to_out.0.weight")):
                shape = tuple(f.get_slice(key).get_shape())
                if len(shape) == 2:
                    shapes[key[len(PREFIX):-len(".weight")]] = (int(shape[0]), int(shape[1]))
    return dict(sorted(shapes.items()))


def make_lora(ckpt: str, seed: int, n_layers: int = 12, rank: int = 4) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    lora: dict[str, torch.Tensor] = {}
    for key, (out_f, in_f) in list(attention_weights(ckpt).items())[:n_layers]:
        name = "lora_unet_" + key.replace(".", "_")
        lora[f"{name}.lora_down.weight"] = torch.randn(rank, in_f, generator=gen) * 0.5
        lora[f"{name}.lora_up.weight"] = torch.randn(out_f, rank, generator=gen) * 0.5
        lora[f"{name}.alpha"] = torch.tensor(float(rank))
    if not lora:
        raise SystemExit(f"{ckpt}: no attention weights found under {PREFIX}")
    return lora


def main(argv: list[str]) -> int:
    ckpt, out, seed = argv[0], argv[1], int(argv[2])
    n_layers = int(argv[3]) if len(argv) > 3 else 12
    rank = int(argv[4]) if len(argv) > 4 else 4
    save_file(make_lora(ckpt, seed, n_layers, rank), out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
