"""A node pack that hard-codes devices in every way the scanner knows. Docstring mentions 'cuda:0'.

cuda:0
"""
import os
import torch
import torch as t
from torch import cuda
from torch.cuda import set_device as pick_gpu
from torch.cuda import current_device
import comfy.model_management as mm
from comfy import model_management
from os import environ

from .util import helper  # noqa: F401

DEVICE = "cuda:0"  # expect: cuda-index-literal
OTHER = torch.device("cuda", 1)  # expect: torch-device-index
BY_KEYWORD = t.device(type="cuda", index=0)  # expect: torch-device-index
MIXED = torch.device("cuda", index=2)  # expect: torch-device-index
BARE_INT = torch.device(3)  # expect: torch-device-index
AS_STRING = torch.device("cuda:1")  # expect: cuda-index-literal
CURRENT = torch.cuda.current_device()  # expect: current-device-at-import
CURRENT_ALIAS = current_device()  # expect: current-device-at-import
MM_DEVICE = mm.get_torch_device()  # expect: current-device-at-import
MM_FROM = model_management.get_torch_device()  # expect: current-device-at-import
MODEL = torch.nn.Linear(2, 2).cuda()  # expect: dot-cuda

os.environ["CUDA_VISIBLE_DEVICES"] = "0"  # expect: cuda-visible-devices-write
environ["CUDA_VISIBLE_DEVICES"] = "1"  # expect: cuda-visible-devices-write
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "0")  # expect: cuda-visible-devices-write
os.environ.update({"CUDA_VISIBLE_DEVICES": "0,1"})  # expect: cuda-visible-devices-write
os.environ.update(CUDA_VISIBLE_DEVICES="0")  # expect: cuda-visible-devices-write
os.putenv("CUDA_VISIBLE_DEVICES", "0")  # expect: cuda-visible-devices-write
del os.environ["CUDA_VISIBLE_DEVICES"]  # expect: cuda-visible-devices-write

torch.cuda.set_device(0)  # expect: set-device
cuda.set_device("cuda:1")  # expect: set-device
pick_gpu(0)  # expect: set-device


class HardCodedNode:
    """Class docstring: 'cuda:1' and torch.cuda.set_device(0) are only words here."""

    device = torch.cuda.current_device()  # expect: current-device-at-import

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"gpu": (["cuda:0", "cuda:1", "cpu"],)}}  # expect: cuda-index-literal, cuda-index-literal

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "run"

    def run(self, image, device=mm.get_torch_device()):  # expect: current-device-at-import
        """Method docstring: call .cuda(0) or .to(0) -- words only."""
        image = image.cuda(0)  # expect: dot-cuda
        image = image.cuda(device=1)  # expect: dot-cuda
        image = image.cuda()  # expect: dot-cuda
        image = image.to(0)  # expect: to-int-device
        image = image.to(device=1, non_blocking=True)  # expect: to-int-device
        image = image.to("cuda:1")  # expect: cuda-index-literal
        image = image.to(torch.device("cuda", 0))  # expect: torch-device-index
        if str(image.device) == "cuda:0":  # expect: cuda-index-literal
            t.cuda.set_device(1)  # expect: set-device
        return (image,)


def with_default(x, device="cuda:0"):  # expect: cuda-index-literal
    return x


def first_gpu_stats(stats):
    return stats["cuda:0"]  # expect: cuda-index-literal


def chained(x):
    return (x.float()
             .cuda(1)  # expect: dot-cuda
             .half())


LAMBDA_DEFAULT = lambda d=torch.cuda.current_device(): d  # expect: current-device-at-import  # noqa: E731
