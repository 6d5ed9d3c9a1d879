"""Cost of an SDO LoRA gradient with and without folding the adapters for no-grad calls.

    python benchmarks/lora_folding.py [--steps 50] [--batch 8] [--repeats 3]

On the embedded digits UNet (LoRA rank 4 on conv1/conv2), each row times one gradient (sample
with SDO, decode, objective, autograd.grad w.r.t. the adapters), median of --repeats, as a ratio
to no-grad sampling of the plain model; the folded gradient is checked against the unfolded one.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from sdo_lightning.backbones import DigitsBackbone
from sdo_lightning.objectives import ClassifierObjective
from sdo_lightning.modules.reward_finetuning import RewardFineTuning
from sdo_lightning.sampling import sample
from sdo_lightning.solvers import DDIM


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    batch = {"index": torch.arange(args.batch), "class_label": torch.full((args.batch,), 10)}
    plain = DigitsBackbone()
    x = torch.randn(args.batch, *plain.latent_shape, generator=torch.Generator().manual_seed(0))
    cond = plain.encode_condition(batch)

    def timed(fn):
        fn()
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t)
        return statistics.median(times), out

    with torch.no_grad():
        floor, _ = timed(lambda: sample(plain.denoise, DDIM(args.steps), x, cond, scheduler_config=plain.scheduler_config))
    rows, grads = [], {}
    for fold in (False, True):
        module = RewardFineTuning(objective=ClassifierObjective(target_class=7), backbone=DigitsBackbone(),
                                  solver=DDIM(args.steps), fold_adapters=fold)
        with torch.no_grad():
            g = torch.Generator().manual_seed(1)
            for q in module.lora_params:
                q.copy_(0.05 * torch.randn(q.shape, generator=g))

        def step():
            module._plan_generator.manual_seed(0)
            images = module.generate(batch, grad=True)
            return torch.autograd.grad(module.objective(images, batch).sum(), module.lora_params)

        seconds, grads[fold] = timed(step)
        rows.append((f"SDO LoRA gradient, {'folded' if fold else 'plain peft'}", seconds, seconds / floor))
    flat = [torch.cat([g.flatten() for g in grads[f]]) for f in (False, True)]
    cosine = torch.nn.functional.cosine_similarity(flat[0], flat[1], dim=0).item()
    print(f"| what | seconds | ratio to no-grad sampling |\n|---|---|---|\n| no-grad sampling (no adapters) | {floor:.3f} | 1.00 |")
    for name, seconds, ratio in rows:
        print(f"| {name} | {seconds:.3f} | {ratio:.2f} |")
    print(f"\ncosine(folded, plain) = {cosine:.6f}; steps {args.steps}, batch {args.batch}, threads {args.threads}")


if __name__ == "__main__":
    main()
