"""Run the quickstart with SDO and with full backprop and judge the results independently.

    python benchmarks/quickstart.py [--modes ShortcutGradient FullBackprop] [--seeds 0 1 2]

For each gradient mode (and seed) it runs `sdo fit --config configs/quickstart.yaml` in a fresh
process, times it, and scores the written samples.npz with a judge the optimization never saw:
:class:`~sdo_lightning.digits.judge.DigitsJudge`, a scikit-learn logistic regression on raw pixels
trained on the real digits (the configs' held-out objective, never optimized). It reports the
shipped classifier's mean target-class probability before and after, the share of optimized
samples the judge calls the target, the mean L2 distance to the unoptimized samples and the
wall time. Prints a markdown table (or JSON with --json).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from sdo_lightning.digits import WEIGHTS_DIR, DigitClassifier
from sdo_lightning.digits.judge import DigitsJudge

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "quickstart.yaml"))
    parser.add_argument("--modes", nargs="+", default=["ShortcutGradient", "FullBackprop"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--target", type=int, default=7)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    judge = DigitsJudge(image_size=16)
    classifier = DigitClassifier.from_pretrained(WEIGHTS_DIR / "classifier")
    rows = []
    for mode in args.modes:
        for seed in args.seeds:
            out = Path(tempfile.mkdtemp())
            cmd = [sys.executable, "-m", "sdo_lightning.cli", "fit", "--config", args.config,
                   "--model.gradient_mode", mode, "--model.seed", str(seed), "--seed_everything", str(seed),
                   "--trainer.logger.init_args.save_dir", str(out)]
            start = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True)
            seconds = time.perf_counter() - start
            data = np.load(next(out.rglob("samples.npz")))
            row = {"mode": mode, "seed": seed, "seconds": round(seconds, 1)}
            for key in ("before", "after"):
                with torch.no_grad():
                    probs = classifier(torch.from_numpy(data[key])).softmax(-1)[:, args.target]
                    called = judge.probabilities(torch.from_numpy(data[key])).argmax(-1) == args.target
                row[f"target_prob_{key}"] = round(probs.mean().item(), 3)
                row[f"judge_target_{key}"] = round(called.double().mean().item(), 3)
            row["l2_to_unoptimized"] = round(float(np.linalg.norm((data["after"] - data["before"]).reshape(len(data["after"]), -1), axis=1).mean()), 3)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        keys = list(rows[0])
        print("| " + " | ".join(keys) + " |")
        print("|" + "---|" * len(keys))
        for row in rows:
            print("| " + " | ".join(str(row[k]) for k in keys) + " |")
    return rows


if __name__ == "__main__":
    main()
