"""A well-behaved node pack. Nothing in it may be reported.

Its docstrings talk about 'cuda:0', torch.device('cuda', 0), x.cuda(0), x.to(0),
torch.cuda.set_device(1) and os.environ['CUDA_VISIBLE_DEVICES'] = '0': words, not code.
"""
import os

import comfy.model_management as mm
import torch

from .nodes import GoodNode  # noqa: F401

# Comments are invisible to the AST: "cuda:0", torch.cuda.set_device(0), x.cuda(1), x.to(0)
DEVICE_TYPE = "cuda"  # plain 'cuda' means the current device, right for every worker
CPU = torch.device("cpu")
ANY_CUDA = torch.device("cuda")
VISIBLE = os.environ.get("CUDA_VISIBLE_DEVICES")  # reading is fine
ALSO_VISIBLE = os.environ["CUDA_VISIBLE_DEVICES"] if "CUDA_VISIBLE_DEVICES" in os.environ else None
GETENV = os.getenv("CUDA_VISIBLE_DEVICES", "")
HELP = "pass cuda:0 to pin the node"  # not exactly a device name
PREFIX = f"cuda:{VISIBLE}"  # computed, not hard-coded
NOT_INDEXED = "cuda:"
GET_DEVICE = mm.get_torch_device  # a reference, not a call
"""cuda:1"""  # an attribute docstring: a string statement does nothing


def get_device():
    """Inside a function body these run per call, on the worker's thread: 'cuda:0' in a docstring is fine."""
    current = torch.cuda.current_device()
    return mm.get_torch_device(), current


class Helper:
    """cuda:0"""

    def device(self):
        """cuda:0"""
        return torch.device("cuda", torch.cuda.current_device())


def make_class():
    class Local:  # a class body inside a function runs when the function runs, not at import
        device = mm.get_torch_device()

    return Local


def run(x, device=None, dtype=torch.float16):
    device = device or mm.get_torch_device()
    x = x.to(device)
    x = x.to(torch.float16)
    x = x.to(dtype=torch.float16)
    x = x.to("cpu")
    x = x.to(device, torch.float16)
    x = x.cuda(device)
    x = x.to(True)  # a bool, not a device index
    later = lambda: torch.cuda.current_device()  # noqa: E731 - runs when called
    return x, later
