"""``sdo mix``: sample with LoRA adapters at a list of scales, alone or combined.

    sdo mix --adapters runs/lightning_logs/version_0/lora --scales 0 0.5 1 1.5 --out mix.png
    sdo mix --adapters A B --weights 1 0.5 --scales 0 1     # theta + s*(1*A + 0.5*B) (paper Fig. 13)

Every row of the grid uses the same starting noise, so rows differ only by the adapter scale.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from sdo_lightning import lora
from sdo_lightning.images import save_labelled_rows
from sdo_lightning.sampling import sample
from sdo_lightning.solvers import DDIM

#: most samples per grid row (each row is one batch through the network)
MAX_SAMPLES = 1024


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sdo mix", description=__doc__.split("\n")[0])
    p.add_argument("--adapters", nargs="+", required=True, help="adapter directories written by RewardFineTuning")
    p.add_argument("--weights", nargs="+", type=float, help="one weight per adapter (default 1 each)")
    p.add_argument("--scales", nargs="+", type=float, default=[0.0, 0.5, 1.0], help="one grid row per scale")
    p.add_argument("--digits", default=None, help="digits model directory (default: the embedded one)")
    p.add_argument("--sd", default=None, help="a Stable Diffusion pipeline directory or hub id instead of digits")
    p.add_argument("--prompt", default="", help="prompt for --sd")
    p.add_argument("--class-label", type=int, default=10, help="digits class (10 = unconditional)")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the backbone's)")
    p.add_argument("--num-samples", type=int, default=8)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="mix.png")
    return p


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse what would fail late or silently give a garbage grid, in one sentence each."""
    import math

    from sdo_lightning.images import image_format

    for option, values in (("--scales", args.scales), ("--weights", args.weights or [])):
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"sdo mix {option} {' '.join(f'{v:g}' for v in values)}: every value must be a finite "
                             "number; e.g. --scales 0 0.5 1.")
    if not 1 <= args.num_samples <= MAX_SAMPLES:
        raise ValueError(f"sdo mix --num-samples {args.num_samples}: give 1 to {MAX_SAMPLES} samples per row.")
    if args.steps < 1:
        raise ValueError(f"sdo mix --steps {args.steps}: give at least 1 sampling step.")
    if Path(args.out).is_dir() or args.out.endswith(("/", os.sep)):
        raise ValueError(f"sdo mix --out {args.out}: that is a directory; give a file name such as mix.png.")
    image_format(args.out)  # a file name PIL writes (mix.png), or one sentence


@torch.no_grad()
def mix(argv: list[str]) -> Path:
    args = build_parser().parse_args(argv)
    check_arguments(args)
    if args.sd is not None:
        from sdo_lightning.backbones import StableDiffusionBackbone

        backbone = StableDiffusionBackbone(args.sd, **({} if args.guidance is None else {"guidance_scale": args.guidance}))
    else:
        from sdo_lightning.backbones import DigitsBackbone

        backbone = DigitsBackbone(args.digits, **({} if args.guidance is None else {"guidance_scale": args.guidance}))
    weights = args.weights or [1.0] * len(args.adapters)
    if len(weights) != len(args.adapters):
        raise SystemExit(f"sdo mix: got {len(args.adapters)} adapters but {len(weights)} weights; give one weight each.")
    names = []
    for i, directory in enumerate(args.adapters):
        if args.sd is not None and (Path(directory) / "pytorch_lora_weights.safetensors").is_file():
            raise SystemExit("sdo mix: diffusers-format adapters load with pipeline.load_lora_weights; use diffusers for SD mixing.")
        lora.load_adapter(backbone.network, directory, f"adapter{i}")
        names.append(f"adapter{i}")
    n = args.num_samples
    batch = {"index": torch.arange(n), "class_label": torch.full((n,), args.class_label), "prompt": [args.prompt] * n}
    cond = backbone.encode_condition(batch)
    x = torch.randn(n, *backbone.latent_shape, generator=torch.Generator().manual_seed(args.seed))
    rows = []
    for scale in args.scales:
        lora.set_adapter_scales(backbone.network, {name: scale * w for name, w in zip(names, weights)})
        x0 = sample(backbone.denoise, DDIM(args.steps), x, cond, scheduler_config=backbone.scheduler_config,
                    generator=torch.Generator().manual_seed(args.seed))
        rows.append((f"scale {scale:g}", backbone.decode(x0)))
    path = save_labelled_rows(rows, args.out)
    print(f"wrote {path} ({len(rows)} rows: scales {args.scales})")
    return path
