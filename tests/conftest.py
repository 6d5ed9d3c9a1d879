import math
import os

# Before torch loads (OpenMP reads it once): the `sdo` processes the tests start, and this one,
# let idle OpenMP threads sleep instead of spinning on a CPU that other jobs share (console.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn

# Tiny models gain nothing from threads, and OpenMP threads slow to a crawl when a core is busy.
torch.set_num_threads(1)


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
        tt = torch.as_tensor(t, dtype=x.dtype).reshape(-1, 1) / 1000.0  # one timestep, or one per row
        emb = self.time(torch.cat([torch.sin(tt * math.pi), torch.cos(tt * math.pi)], dim=1))
        h = torch.tanh(self.conv1(x) + emb[:, :, None, None])
        out = self.conv2(h) + 0.5 * x
        self.calls.append(out.requires_grad)
        return out


@pytest.fixture
def denoiser():
    return TinyDenoiser()


def as_denoiser(net):
    return lambda x, t, cond: net(x, t, cond)


def build_tiny_digits(root, image_size: int = 8, seed: int = 0, flow: bool = False):
    """A tiny random digits model in the layout the recipe writes: unet/, scheduler/, classifier/
    (``flow``: a FlowMatchEulerDiscreteScheduler config, as ``train --flow`` writes)."""
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler, UNet2DModel

    from sdo_lightning.digits import DigitClassifier

    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=image_size, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4, num_class_embeds=11,
    )
    unet.save_pretrained(root / "unet")
    if flow:
        FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0).save_pretrained(root / "scheduler")
    else:
        DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=False).save_pretrained(root / "scheduler")
    DigitClassifier(image_size=image_size, channels=(4, 8), hidden=16, norm_groups=2).save_pretrained(root / "classifier")
    return root


@pytest.fixture(scope="session")
def tiny_digits_dir(tmp_path_factory):
    return build_tiny_digits(tmp_path_factory.mktemp("tiny_digits"))


@pytest.fixture
def tiny_weights(tiny_digits_dir, monkeypatch):
    """Point the embedded-default weights at the tiny random model."""
    import sdo_lightning.digits as digits

    monkeypatch.setattr(digits, "WEIGHTS_DIR", tiny_digits_dir)
    return tiny_digits_dir
