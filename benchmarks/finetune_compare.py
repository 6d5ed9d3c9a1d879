"""Reward fine-tuning of the embedded digits model: SDO against AlignProp baselines.

    python benchmarks/finetune_compare.py [--steps 100] [--out docs/finetune_reward.png]

Runs configs/digits/finetune_lora.yaml's setting (LoRA rank 4, AdamW lr 3e-3, DDIM 20 steps,
batch 8, reward log p(7) from the shipped classifier) with each gradient mode on the same seeds,
records the reward of every optimizer step and the wall time per step, then scores 256 fresh
samples per mode (share classified 7 with confidence > 0.9). Prints a markdown table and writes
the reward curves as a PNG.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch
from lightning.pytorch import Callback, Trainer, seed_everything

from sdo_lightning.backbones import DigitsBackbone
from sdo_lightning.training.data import SampleSet
from sdo_lightning.digits import WEIGHTS_DIR, DigitClassifier
from sdo_lightning.gradient_modes import ShortcutGradient, TruncatedBackprop
from sdo_lightning.objectives import ClassifierObjective
from sdo_lightning.modules.reward_finetuning import RewardFineTuning
from sdo_lightning.solvers import DDIM

MODES = {
    "SDO": lambda: ShortcutGradient(),
    "AlignProp-uniform": lambda: TruncatedBackprop(random_k=True),
    "AlignProp-1": lambda: TruncatedBackprop(k=1),
}


class Recorder(Callback):
    def __init__(self) -> None:
        self.rewards: list[float] = []
        self.times: list[float] = []
        self._t = 0.0

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.times.append(time.perf_counter() - self._t)
        self.rewards.append(-float(outputs["loss"]))


def plot(curves: dict[str, list[float]], path: str) -> None:
    from PIL import Image, ImageDraw

    w, h, m = 640, 360, 50
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    lo = min(min(c) for c in curves.values())
    hi = max(max(c) for c in curves.values())
    n = max(len(c) for c in curves.values())
    d.rectangle([m, 20, w - 20, h - m], outline="black")
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]
    for (name, c), color in zip(curves.items(), colors):
        pts = [(m + (w - 20 - m) * i / max(n - 1, 1), h - m - (h - m - 20) * (v - lo) / max(hi - lo, 1e-9)) for i, v in enumerate(c)]
        d.line(pts, fill=color, width=2)
        d.text((m + 10, 25 + 14 * list(curves).index(name)), name, fill=color)
    d.text((m, h - m + 8), "0", fill="black")
    d.text((w - 40, h - m + 8), str(n), fill="black")
    d.text((w // 2 - 60, h - 25), "optimizer step", fill="black")
    d.text((5, 20), f"{hi:.2f}", fill="black")
    d.text((5, h - m - 10), f"{lo:.2f}", fill="black")
    d.text((5, h // 2 - 30), "reward", fill="black")
    d.text((5, h // 2 - 16), "log p(7)", fill="black")
    img.save(path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--modes", nargs="+", default=list(MODES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="docs/finetune_reward.png")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    classifier = DigitClassifier.from_pretrained(WEIGHTS_DIR / "classifier")
    rows, curves = [], {}
    for name in args.modes:
        seed_everything(args.seed)
        module = RewardFineTuning(objective=ClassifierObjective(target_class=7), backbone=DigitsBackbone(),
                                  solver=DDIM(20), gradient_mode=MODES[name](), lr=3e-3, seed=args.seed)
        rec = Recorder()
        Trainer(max_steps=args.steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, callbacks=[rec],
                default_root_dir=tempfile.mkdtemp()).fit(
            module, datamodule=SampleSet(num_samples=8))
        with torch.no_grad():
            images = []
            for k in range(4):
                module.seed = 1000 + k  # fresh noise, never seen in training
                images.append(module.generate({"index": torch.arange(64), "class_label": torch.full((64,), 10)}, grad=False))
            probs = classifier(torch.cat(images)).softmax(-1)[:, 7]
        curves[name] = rec.rewards
        row = {"mode": name, "steps": args.steps, "sec_per_step": round(sum(rec.times[1:]) / max(len(rec.times) - 1, 1), 3),
               "reward_first10": round(sum(rec.rewards[:10]) / 10, 3), "reward_last10": round(sum(rec.rewards[-10:]) / 10, 3),
               "share_7_conf_gt_0.9": round((probs > 0.9).float().mean().item(), 3)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    plot(curves, args.out)
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(str(r[k]) for k in keys) + " |")


if __name__ == "__main__":
    main()
