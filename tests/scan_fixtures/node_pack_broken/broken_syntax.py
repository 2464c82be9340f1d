import torch

device = "cuda"
x = = torch.cuda.current_device()  # expect: unparsable
