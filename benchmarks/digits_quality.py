"""Quality benchmark for the embedded default digits model.

Draws unconditional samples (null class 10, no guidance) from the shipped UNet through the
project's own pieces, ``DigitsBackbone`` (conditioning, classifier-free guidance, decoding) and
``sdo_lightning.sample`` with a 50-step ``DDIM`` (eta 0), and reports:

(a) agreement between the shipped classifier's argmax and an independent judge, a
    scikit-learn LogisticRegression on raw pixels trained on the real digits at the same
    resolution (it never sees samples or the classifier);
(b) the classifier's mean top-1 confidence;
(c) the normalized entropy of the classifier's predicted-class histogram (entropy / log 10);
(d) class-conditional accuracy: ``--per-class`` guided samples per digit, judged by the judge.

Usage (from the repository root)::

    python benchmarks/digits_quality.py [--weights DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

from sdo_lightning import sample
from sdo_lightning.backbones import DigitsBackbone
from sdo_lightning.digits import WEIGHTS_DIR, DigitClassifier, load_digits_images
from sdo_lightning.solvers import DDIM

NULL_CLASS = DigitsBackbone.NULL_CLASS
TARGETS = {"judge_agreement": 0.85, "mean_confidence": 0.9, "class_entropy": 0.9}


@torch.no_grad()
def ddim_sample(backbone: DigitsBackbone, labels: torch.Tensor, steps: int, generator: torch.Generator,
                batch_size: int = 256) -> torch.Tensor:
    """Samples in [0, 1] for the given class labels, with the backbone's guidance scale (the null
    class is one plain pass). All the start noise is drawn first, then sampled in batches."""
    noise = torch.randn(labels.shape[0], *backbone.latent_shape, generator=generator)
    solver = DDIM(steps)  # eta 0
    outs = []
    for start in range(0, labels.shape[0], batch_size):
        cond = backbone.encode_condition({"class_label": labels[start : start + batch_size]})
        x0 = sample(backbone.denoise, solver, noise[start : start + batch_size], cond,
                    scheduler_config=backbone.scheduler_config)
        outs.append(backbone.decode(x0))
    return torch.cat(outs)


def normalized_entropy(pred: np.ndarray, num_classes: int = 10) -> float:
    hist = np.bincount(pred, minlength=num_classes) / len(pred)
    nz = hist[hist > 0]
    return float(-(nz * np.log(nz)).sum() / math.log(num_classes))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description="Quality benchmark of the embedded digits model.")
    p.add_argument("--weights", type=Path, default=WEIGHTS_DIR)
    p.add_argument("--num-samples", type=int, default=256)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance", type=float, default=2.5,
                   help="guidance scale for the class-conditional part (<= 0: plain conditional pass, as 1)")
    p.add_argument("--per-class", type=int, default=25)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--grid", type=Path, default=None, help="also save a PNG grid of the unconditional samples")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()

    # guidance <= 0 meant "plain conditional pass": guidance scale 1 is exactly that
    backbone = DigitsBackbone(str(args.weights), guidance_scale=args.guidance if args.guidance > 0 else 1.0).eval()
    classifier = DigitClassifier.from_pretrained(args.weights / "classifier")
    size = backbone.latent_shape[-1]

    images, labels = load_digits_images(size)
    judge = LogisticRegression(max_iter=5000)
    judge.fit(images.flatten(1).numpy(), labels.numpy())

    gen = torch.Generator().manual_seed(args.seed)
    uncond = ddim_sample(backbone, torch.full((args.num_samples,), NULL_CLASS), args.steps, gen)
    with torch.no_grad():
        probs = classifier(uncond).softmax(1).numpy()
    clf_pred = probs.argmax(1)
    judge_pred = judge.predict(uncond.flatten(1).numpy())

    per_class, cond_accuracy = {}, float("nan")
    if args.per_class > 0:
        cond_labels = torch.arange(10).repeat_interleave(args.per_class)
        cond = ddim_sample(backbone, cond_labels, args.steps, gen)
        cond_pred = judge.predict(cond.flatten(1).numpy())
        per_class = {str(c): float((cond_pred[cond_labels.numpy() == c] == c).mean()) for c in range(10)}
        cond_accuracy = float((cond_pred == cond_labels.numpy()).mean())

    results = {
        "sample_size": size,
        "num_samples": args.num_samples,
        "ddim_steps": args.steps,
        "seed": args.seed,
        "judge_agreement": float((clf_pred == judge_pred).mean()),
        "mean_confidence": float(probs.max(1).mean()),
        "class_entropy": normalized_entropy(clf_pred),
        "class_histogram": np.bincount(clf_pred, minlength=10).tolist(),
        "conditional_guidance": args.guidance,
        "conditional_per_class": args.per_class,
        "conditional_accuracy": cond_accuracy,
        "conditional_accuracy_by_class": per_class,
        "seconds": round(time.time() - t0, 1),
    }
    results["passes_targets"] = all(results[k] >= v for k, v in TARGETS.items())

    print(json.dumps(results, indent=2))
    print()
    print("| metric | value | target |")
    print("|---|---|---|")
    print(f"| (a) classifier/judge agreement | {results['judge_agreement']:.3f} | >= {TARGETS['judge_agreement']} |")
    print(f"| (b) classifier mean top-1 confidence | {results['mean_confidence']:.3f} | >= {TARGETS['mean_confidence']} |")
    print(f"| (c) normalized class entropy | {results['class_entropy']:.3f} | >= {TARGETS['class_entropy']} |")
    print(
        f"| (d) conditional accuracy (judge, guidance {args.guidance}, {args.per_class}/class) "
        f"| {results['conditional_accuracy']:.3f} | - |"
    )
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    if args.grid is not None:
        from PIL import Image  # only for the optional picture

        n, cols, scale = uncond.shape[0], 16, 4
        rows = math.ceil(n / cols)
        canvas = torch.ones(rows * (size + 1) + 1, cols * (size + 1) + 1)
        for i in range(n):
            r, c = divmod(i, cols)
            canvas[1 + r * (size + 1) : 1 + r * (size + 1) + size, 1 + c * (size + 1) : 1 + c * (size + 1) + size] = uncond[i, 0]
        pixels = (canvas.repeat_interleave(scale, 0).repeat_interleave(scale, 1) * 255).round().byte().numpy()
        Image.fromarray(pixels, mode="L").save(args.grid)
    return results


if __name__ == "__main__":
    main()
