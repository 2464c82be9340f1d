import comfy.model_management as model_management
import torch


class GoodNode:
    """Moves its input to the running worker's GPU."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE",)}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "run"

    def run(self, image):
        device = model_management.get_torch_device()
        offload = model_management.intermediate_device()
        with torch.cuda.device(device):
            out = image.to(device) * 2
        return (out.to(offload),)


NODE_CLASS_MAPPINGS = {"GoodNode": GoodNode}
