import math

import pytest
import torch
from torch import nn

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


class TinyDenoiser(nn.Module):
    """A small non-linear epsilon network: two convolutions with a timestep embedding.

    ``calls`` records, for every call, whether its output holds an autograd graph.
    """

    def __init__(self, channels: int = 1, hidden: int = 8, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv1 = nn.Conv2d(channels, hidden, 3, padding=1)
        self.conv2 = nn.Conv2d(hidden, channels, 3, padding=1)
        self.time = nn.Linear(2, hidden)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        self.calls: list[bool] = []
        self.entered = 0  # forward passes begun, including checkpointing's recomputations

    def forward(self, x, t, cond=None):
        self.entered += 1
        tt = torch.as_tensor(t, dtype=x.dtype).reshape(1) / 1000.0
        emb = self.time(torch.cat([torch.sin(tt * math.pi), torch.cos(tt * math.pi)]))
        h = torch.tanh(self.conv1(x) + emb[None, :, None, None])
        out = self.conv2(h) + 0.5 * x
        self.calls.append(out.requires_grad)
        return out


@pytest.fixture
def denoiser():
    return TinyDenoiser()


def as_denoiser(net):
    return lambda x, t, cond: net(x, t, cond)
