"""Recipe for the embedded default model (tiny class-conditional diffusion UNet + digit classifier).

Run from the repository root::

    python -m sdo_lightning.digits.train --out sdo_lightning/digits/weights

It is seeded and uses deterministic ops on one CPU thread, so a rerun with the same arguments
and library versions writes the same weights. It writes ``unet/`` (diffusers ``UNet2DModel``,
EMA weights), ``scheduler/`` (``DDPMScheduler`` config), ``classifier/`` (:class:`DigitClassifier`)
and ``recipe.json`` (the arguments used).

Conventions: the UNet works on images scaled to [-1, 1] (``x * 2 - 1``) and takes class labels
0..9 plus the null label 10 (classifier-free guidance); the classifier takes images in [0, 1].
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sdo_lightning.digits.classifier import DigitClassifier
from sdo_lightning.digits.data import load_digits_images

NULL_CLASS = 10
NUM_CLASSES = 10


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)


def _lr_factor(step: int, total: int, warmup: int, final: float = 0.05) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _random_shift(images: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Translate each image by an integer offset in [-max_shift, max_shift] (zero fill)."""
    if max_shift <= 0:
        return images
    b, _, h, w = images.shape
    padded = F.pad(images, (max_shift,) * 4)
    dy = torch.randint(0, 2 * max_shift + 1, (b,), generator=gen)
    dx = torch.randint(0, 2 * max_shift + 1, (b,), generator=gen)
    rows = torch.arange(h)[None, :] + dy[:, None]
    cols = torch.arange(w)[None, :] + dx[:, None]
    out = padded[torch.arange(b)[:, None, None], 0, rows[:, :, None], cols[:, None, :]]
    return out.unsqueeze(1)


def _noise_images(n: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """Images that are not digits: clamped Gaussian noise with random mean/std, or uniform noise."""
    mean = torch.rand(n, 1, 1, 1, generator=gen) * 0.6
    std = 0.1 + torch.rand(n, 1, 1, 1, generator=gen) * 0.6
    gauss = mean + std * torch.randn(n, 1, size, size, generator=gen)
    uniform = torch.rand(n, 1, size, size, generator=gen)
    pick = torch.rand(n, 1, 1, 1, generator=gen) < 0.5
    return torch.where(pick, gauss, uniform).clamp(0.0, 1.0)


def train_classifier(images, labels, args, gen: torch.Generator) -> DigitClassifier:
    n = images.shape[0]
    perm = torch.randperm(n, generator=gen)
    n_val = args.clf_val
    val_idx, train_idx = perm[:n_val], perm[n_val:]
    model = DigitClassifier(image_size=args.size, channels=args.clf_channels, hidden=args.clf_hidden)
    opt = torch.optim.AdamW(model.parameters(), lr=args.clf_lr, weight_decay=1e-4)
    sigmas = torch.tensor([0.0, 0.0, 0.0, 0.05, 0.1, 0.2, 0.3, 0.45, 0.6, 0.8])
    max_shift = max(1, args.size // 8)
    n_noise = args.clf_batch // 8
    t0 = time.time()
    for step in range(args.clf_steps):
        for group in opt.param_groups:
            group["lr"] = args.clf_lr * _lr_factor(step, args.clf_steps, 100)
        idx = train_idx[torch.randint(0, train_idx.numel(), (args.clf_batch,), generator=gen)]
        x, y = images[idx], labels[idx]
        x = _random_shift(x, max_shift, gen)
        sigma = sigmas[torch.randint(0, sigmas.numel(), (x.shape[0],), generator=gen)].view(-1, 1, 1, 1)
        x = (x + sigma * torch.randn(x.shape, generator=gen)).clamp(0.0, 1.0)
        outliers = _noise_images(n_noise, args.size, gen)
        logits = model(torch.cat([x, outliers]))
        loss_digits = F.cross_entropy(logits[: x.shape[0]], y)
        # Outlier exposure: pure noise should get a flat (uniform) prediction.
        loss_noise = -F.log_softmax(logits[x.shape[0]:], dim=1).mean()
        loss = loss_digits + args.clf_noise_weight * loss_noise
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % args.log_every == 0 or step + 1 == args.clf_steps:
            model.eval()
            with torch.no_grad():
                acc = (model(images[val_idx]).argmax(1) == labels[val_idx]).float().mean().item()
                noisy = (images[val_idx] + 0.3 * torch.randn(images[val_idx].shape, generator=gen)).clamp(0, 1)
                acc_noisy = (model(noisy).argmax(1) == labels[val_idx]).float().mean().item()
                conf_noise = model(_noise_images(256, args.size, gen)).softmax(1).amax(1).mean().item()
            model.train()
            print(
                f"[classifier] step {step + 1}/{args.clf_steps} loss {loss_digits.item():.4f}/{loss_noise.item():.4f} "
                f"val acc {acc:.3f} (sigma 0.3: {acc_noisy:.3f}) noise conf {conf_noise:.3f} "
                f"{time.time() - t0:.0f}s",
                flush=True,
            )
    return model.eval()


def build_unet(args):
    from diffusers import UNet2DModel

    channels = tuple(args.unet_channels)
    n = len(channels)
    return UNet2DModel(
        sample_size=args.size,
        in_channels=1,
        out_channels=1,
        block_out_channels=channels,
        down_block_types=("DownBlock2D",) * n,
        up_block_types=("UpBlock2D",) * n,
        layers_per_block=args.unet_layers_per_block,
        norm_num_groups=args.unet_norm_groups,
        attention_head_dim=8,
        add_attention=bool(args.unet_mid_attention),
        num_class_embeds=NUM_CLASSES + 1,
        dropout=0.0,
    )


def build_scheduler(flow: bool = False):
    if flow:  # rectified flow: x_t = (1 - sigma) x_0 + sigma noise, the UNet predicts noise - x_0
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        prediction_type="epsilon",
        clip_sample=False,
    )


def _flow_batch(x0: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A rectified-flow training batch: sigma from a logit-normal (mean 0, std 1, as SD3 trains),
    the noisy x_t, the UNet's timestep sigma * 1000 and the velocity target noise - x_0."""
    sigma = torch.sigmoid(torch.randn(x0.shape[0], generator=gen))
    noise = torch.randn(x0.shape, generator=gen)
    s = sigma.view(-1, 1, 1, 1)
    return (1.0 - s) * x0 + s * noise, sigma * 1000.0, noise - x0


def train_unet(images, labels, args, gen: torch.Generator):
    unet = build_unet(args).train()
    ema = build_unet(args).eval().requires_grad_(False)
    ema.load_state_dict(unet.state_dict())
    scheduler = build_scheduler(args.flow)
    if not args.flow:
        alphas_cumprod = scheduler.alphas_cumprod.float()
        snr = alphas_cumprod / (1.0 - alphas_cumprod)
        loss_weight = snr.clamp(max=args.min_snr_gamma) / snr  # min-SNR weighting for epsilon prediction
    data = images * 2.0 - 1.0
    opt = torch.optim.AdamW(unet.parameters(), lr=args.unet_lr, weight_decay=0.0)
    params, ema_params = list(unet.parameters()), list(ema.parameters())
    n_params = sum(p.numel() for p in params)
    print(f"[unet] {n_params / 1e6:.3f}M parameters, sample_size {args.size}", flush=True)
    t0, running = time.time(), 0.0
    for step in range(args.unet_steps):
        for group in opt.param_groups:
            group["lr"] = args.unet_lr * _lr_factor(step, args.unet_steps, args.unet_warmup)
        idx = torch.randint(0, data.shape[0], (args.unet_batch,), generator=gen)
        x0, y = data[idx], labels[idx].clone()
        y[torch.rand(y.shape, generator=gen) < args.cfg_dropout] = NULL_CLASS
        if args.flow:
            xt, t, target = _flow_batch(x0, gen)
            loss = ((unet(xt, t, class_labels=y).sample - target) ** 2).mean()
        else:
            t = torch.randint(0, scheduler.config.num_train_timesteps, (x0.shape[0],), generator=gen)
            noise = torch.randn(x0.shape, generator=gen)
            a = alphas_cumprod[t].view(-1, 1, 1, 1)
            xt = a.sqrt() * x0 + (1.0 - a).sqrt() * noise
            pred = unet(xt, t, class_labels=y).sample
            loss = ((pred - noise) ** 2).mean(dim=(1, 2, 3))
            loss = (loss * loss_weight[t]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema_decay, (1.0 + step) / (10.0 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1.0 - decay)
        running += loss.item()
        if (step + 1) % args.log_every == 0 or step + 1 == args.unet_steps:
            k = (step % args.log_every) + 1
            elapsed = time.time() - t0
            eta = elapsed / (step + 1) * (args.unet_steps - step - 1)
            print(
                f"[unet] step {step + 1}/{args.unet_steps} loss {running / k:.4f} "
                f"lr {opt.param_groups[0]['lr']:.2e} {elapsed:.0f}s (eta {eta:.0f}s)",
                flush=True,
            )
            running = 0.0
    for buf_ema, buf in zip(ema.buffers(), unet.buffers()):
        buf_ema.copy_(buf)
    return ema, scheduler


@torch.no_grad()
def quick_check(unet, scheduler_config, classifier, n: int, steps: int, seed: int) -> dict:
    """Sample ``n`` unconditional digits (DDIM, or Euler for a flow model) and summarize the
    classifier's view of them."""
    from sdo_lightning.sampling import sample
    from sdo_lightning.solvers import DDIM, FlowMatchEuler

    solver = FlowMatchEuler(steps) if str(scheduler_config.get("_class_name", "")).startswith("FlowMatch") else DDIM(steps)

    gen = torch.Generator().manual_seed(seed)
    size = unet.config.sample_size
    x = torch.randn(n, 1, size, size, generator=gen)
    y = torch.full((n,), NULL_CLASS, dtype=torch.long)
    x = sample(lambda x, t, labels: unet(x, t, class_labels=labels).sample, solver, x, y,
               scheduler_config=dict(scheduler_config))
    probs = classifier(((x + 1) / 2).clamp(0, 1)).softmax(1)
    hist = torch.bincount(probs.argmax(1), minlength=NUM_CLASSES).float() / n
    entropy = -(hist[hist > 0] * hist[hist > 0].log()).sum().item() / math.log(NUM_CLASSES)
    return {"mean_confidence": probs.amax(1).mean().item(), "class_entropy": entropy}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "weights")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=16, help="image resolution (8 = native digits)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 keeps runs reproducible)")
    p.add_argument("--steps", "--unet-steps", dest="unet_steps", type=int, default=3500)
    p.add_argument("--unet-batch", type=int, default=64)
    p.add_argument("--unet-lr", type=float, default=2e-3)
    p.add_argument("--unet-warmup", type=int, default=200)
    p.add_argument("--unet-channels", type=int, nargs="+", default=[16, 32, 64])
    p.add_argument("--unet-layers-per-block", type=int, default=1)
    p.add_argument("--unet-norm-groups", type=int, default=8)
    p.add_argument("--unet-mid-attention", type=int, default=1, choices=[0, 1])
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--cfg-dropout", type=float, default=0.2, help="fraction of labels replaced by the null class")
    p.add_argument("--min-snr-gamma", type=float, default=5.0)
    p.add_argument("--clf-steps", type=int, default=800)
    p.add_argument("--clf-batch", type=int, default=128)
    p.add_argument("--clf-lr", type=float, default=2e-3)
    p.add_argument("--clf-channels", type=int, nargs="+", default=[16, 32])
    p.add_argument("--clf-hidden", type=int, default=128)
    p.add_argument("--clf-val", type=int, default=180, help="digits held out to report classifier accuracy")
    p.add_argument("--clf-noise-weight", type=float, default=0.5)
    p.add_argument("--check-samples", type=int, default=128, help="0 skips the final sampling check")
    p.add_argument("--flow", action="store_true",
                   help="train a rectified-flow (velocity) UNet instead of the DDPM one; the classifier is not "
                        "trained again (the shipped one scores both models)")
    p.add_argument("--log-every", type=int, default=250)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    _seed_everything(args.seed)
    start = time.time()
    images, labels = load_digits_images(args.size)
    print(f"digits: {tuple(images.shape)} at {args.size}x{args.size}, seed {args.seed}", flush=True)

    if args.flow:
        from sdo_lightning.digits import WEIGHTS_DIR

        classifier = DigitClassifier.from_pretrained(WEIGHTS_DIR / "classifier").eval()
    else:
        classifier = train_classifier(images, labels, args, torch.Generator().manual_seed(args.seed))
    unet, scheduler = train_unet(images, labels, args, torch.Generator().manual_seed(args.seed + 1))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(out / "unet", safe_serialization=True)
    scheduler.save_pretrained(out / "scheduler")
    if not args.flow:
        classifier.save_pretrained(out / "classifier")
    recipe = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "out"}
    recipe["torch"] = torch.__version__
    (out / "recipe.json").write_text(json.dumps(recipe, indent=2, sort_keys=True) + "\n")
    print(f"wrote {out} in {time.time() - start:.0f}s", flush=True)

    if args.check_samples > 0:
        stats = quick_check(unet.eval(), scheduler.config, classifier, args.check_samples, 50, args.seed)
        print(
            f"check: {args.check_samples} unconditional 50-step samples, classifier mean confidence "
            f"{stats['mean_confidence']:.3f}, normalized class entropy {stats['class_entropy']:.3f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
