"""Does the digits LoRA demo draw real, varied 7s? Fit a config, then judge its adapter on fresh seeds.

    python benchmarks/lora_demo_quality.py --config configs/digits/finetune_lora_anchored.yaml [overrides ...]
    python benchmarks/lora_demo_quality.py --adapter runs/.../lora --config ...   # judge an existing adapter

Fits with ``sdo fit`` (in this process; CPU seconds by ``time.process_time``), then samples the
exported adapter (``<log dir>/lora``: the selected checkpoint's, with a monitored ModelCheckpoint)
on ``--samples`` fresh seeds (``--seed 5000``: never a training or validation seed of the demo)
and the base model's 7s from the same seeds, and reports issue 23's figures:

- ``judge_7``: share that DigitsJudge (a logistic regression on real digits) calls 7 (goal >= 0.9);
- ``diversity_ratio``: mean pairwise distance of the classifier's features (``val/diversity``),
  against the base 7s' (goal >= 0.8); ``pixel_diversity_ratio`` the same on pixels;
- ``nearest_real_ratio``: mean L2 pixel distance to the nearest real 7 (the 1797 bundled digits),
  against the base 7s' (goal <= 1.3);
- ``pixel_fid``: pixel-space FID to the base 7s (goal <= 15).

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def fit(config: str, overrides: list[str]) -> tuple[Path, float, int]:
    """``sdo fit`` in this process; (exported adapter directory, CPU seconds, optimizer steps)."""
    from sdo_lightning.cli import main

    start = time.process_time()
    cli = main(["fit", "--config", config, "--trainer.enable_progress_bar", "false", *overrides])
    return (Path(cli.trainer.log_dir) / "lora").resolve(), time.process_time() - start, int(cli.trainer.global_step)


@torch.no_grad()
def judge(config: str, adapter: Path, samples: int, seed: int, overrides: list[str]) -> dict[str, float]:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from _models import cli_parts

    from sdo_lightning.digits import load_digits_images
    from sdo_lightning.digits.judge import DigitsJudge
    from sdo_lightning.metrics import Evaluation, mean_pairwise_distance

    model_overrides = [a for i, a in enumerate(overrides) if a.startswith("--model.") or (
        i > 0 and overrides[i - 1].startswith("--model.") and "=" not in overrides[i - 1] and not a.startswith("--"))]
    module, _ = cli_parts(["--config", config, "--model.adapter", str(adapter), "--trainer.logger", "false",
                           *model_overrides])
    module.eval()
    index = torch.arange(samples)
    rows = {"index": index, "seed": index + seed, "class_label": torch.full((samples,), 10),
            "reference_class_label": torch.full((samples,), 7)}
    images = torch.cat([module.generate_for_eval({k: v[i:i + 32] for k, v in rows.items()}) for i in range(0, samples, 32)])
    base = torch.cat([module.generate_reference({k: v[i:i + 32] for k, v in rows.items()}) for i in range(0, samples, 32)])
    metrics = Evaluation(kid_subset_size=min(50, samples)).build(1)
    metrics.update(images, base)
    values = metrics.compute()
    judged = DigitsJudge(target_class=7, image_size=images.shape[-1])
    real, labels = load_digits_images(images.shape[-1])
    sevens = real[labels == 7].flatten(1).double()

    def nearest(x: torch.Tensor) -> float:
        return float(torch.cdist(x.flatten(1).double(), sevens).min(1).values.mean())

    out = {
        "judge_7": float((judged.probabilities(images).argmax(1) == 7).double().mean()),
        "base_judge_7": float((judged.probabilities(base).argmax(1) == 7).double().mean()),
        "diversity": values["diversity"], "base_diversity": values["base_diversity"],
        "pixel_diversity": float(mean_pairwise_distance(images.flatten(1))),
        "base_pixel_diversity": float(mean_pairwise_distance(base.flatten(1))),
        "nearest_real_7": nearest(images), "base_nearest_real_7": nearest(base),
        "pixel_fid": values["pixel_fid"],
    }
    out["diversity_ratio"] = out["diversity"] / out["base_diversity"]
    out["pixel_diversity_ratio"] = out["pixel_diversity"] / out["base_pixel_diversity"]
    out["nearest_real_ratio"] = out["nearest_real_7"] / out["base_nearest_real_7"]
    out["passes"] = (out["judge_7"] >= 0.9 and out["diversity_ratio"] >= 0.8 and out["nearest_real_ratio"] <= 1.3
                     and out["pixel_fid"] <= 15)
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--adapter", default=None, help="judge this exported adapter instead of fitting")
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--seed", type=int, default=5000)
    p.add_argument("--threads", type=int, default=1)
    args, overrides = p.parse_known_args(argv)
    torch.set_num_threads(args.threads)
    row: dict = {"config": args.config, "overrides": " ".join(overrides)}
    adapter = Path(args.adapter).resolve() if args.adapter else None
    if adapter is None:
        adapter, seconds, steps = fit(args.config, overrides)
        row.update(cpu_seconds=round(seconds, 1), steps=steps)
    from sdo_lightning.lora import read_model_card

    card = read_model_card(adapter)
    row.update(adapter=str(adapter), selected_step=card.get("steps"), final_step=card.get("final_step"))
    row.update(judge(args.config, adapter, args.samples, args.seed, overrides))
    print(json.dumps(row), flush=True)
    return row


if __name__ == "__main__":
    main()
