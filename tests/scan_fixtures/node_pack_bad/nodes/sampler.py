import os

import torch


class Sampler:
    def sample(self, latent):
        os.environ["CUDA_VISIBLE_DEVICES"] = str(self.gpu)  # expect: cuda-visible-devices-write
        noise = torch.randn(latent.shape, device="cuda:1")  # expect: cuda-index-literal
        return noise.to(latent.device)
