"""Copy a .safetensors checkpoint and change a few of its tensors in place: another model of the same shape, cheaply.

usage: python perturb_ckpt.py SRC.safetensors DST.safetensors SEED

The copy is a plain file copy (the kernel's copy_file_range where it can); then the floating-point tensors named
below (the UNet's first and last convolutions, a text encoder's final layer norm, the VAE decoder's output
convolution; or the first four floating-point tensors if none of those exist) are scaled by seeded noise of a
few percent. The result loads like the source, has another file identity and other outputs, and costs seconds
instead of the minutes a new random checkpoint takes (bench/affinity.py needs three SDXL-shaped ones).
"""

from __future__ import annotations

import json
import shutil
import struct
import sys
import time

import numpy as np

PICK = ("model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.out.2.weight",
        "first_stage_model.decoder.conv_out.weight", "final_layer_norm.weight")
DTYPES = {"F16": np.float16, "BF16": None, "F32": np.float32}


def perturb(src: str, dst: str, seed: int) -> list[str]:
    shutil.copyfile(src, dst)
    with open(dst, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    base = 8 + header_len
    tensors = {k: v for k, v in header.items() if k != "__metadata__" and DTYPES.get(v["dtype"]) is not None}
    chosen = [k for k in tensors if any(k.endswith(p) for p in PICK)] or sorted(tensors)[:4]
    rng = np.random.default_rng(seed)
    for key in chosen:
        info = tensors[key]
        begin, end = info["data_offsets"]
        dtype = DTYPES[info["dtype"]]
        data = np.memmap(dst, dtype=np.uint8, mode="r+", offset=base + begin, shape=(end - begin,)).view(dtype)
        noise = 1.0 + 0.05 * rng.standard_normal(data.shape, dtype=np.float32)
        data[:] = (data.astype(np.float32) * noise).astype(dtype)
        data.flush()
        del data
    return chosen


if __name__ == "__main__":
    started = time.time()
    src, dst, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
    keys = perturb(src, dst, seed)
    print(f"{dst}: copy of {src} with {len(keys)} tensors perturbed (seed {seed}) in {time.time() - started:.1f}s")
