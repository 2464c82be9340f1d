"""Helpers that cache the device at import time in less obvious ways."""
import functools

import comfy.model_management
import model_management as legacy_mm  # ComfyUI root on sys.path, as old node packs do
import torch.cuda as tc


def helper():
    return None


@functools.lru_cache(maxsize=comfy.model_management.get_torch_device().index)  # expect: current-device-at-import
def cached(x):
    return x


DEVICES = [tc.current_device() for _ in range(2)]  # expect: current-device-at-import
LEGACY = legacy_mm.get_torch_device()  # expect: current-device-at-import
NON_ASCII = "ü"; CUDA = "cuda:0"  # expect: cuda-index-literal
TARGET = f"cuda:0"  # expect: cuda-index-literal


def loader(path):
    model = torch_load(path)
    tc.set_device(0)  # expect: set-device
    return model.to(3)  # expect: to-int-device


def torch_load(path):
    return path
