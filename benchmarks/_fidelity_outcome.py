"""Outcome of each gradient mode on the digits tasks (part of ``benchmarks/fidelity.py``).

Each run is an in-process ``sdo fit`` (``sdo_lightning.cli.main(..., run=False)`` then
``trainer.fit``) of configs/quickstart.yaml (latent x_T, 50 Adam steps) or of
configs/digits/finetune_lora.yaml (LoRA, shortened to 100 steps, with the paper's gradient
clipping 1.0), with the gradient mode, seed and step count overridden. Both are read from frozen
copies beside this file (``_fidelity_quickstart.yaml``, ``_fidelity_lora.yaml``), so later edits
of the shipped configs (validation loops, held-out judges) do not change what is measured. Recorded per run:

* the objective reached (latent: mean best loss of the 16 samples; LoRA: the classifier's
  -log p(7) on 64 fresh samples of the fine-tuned model, noise never used in training);
* the independent judge: the share of samples a logistic regression on raw pixels, trained on
  the real digits (as benchmarks/quickstart.py builds it), calls a 7;
* wall and process (CPU) time of the fit, and the largest number of bytes saved for backward in
  one step (``torch.autograd.graph.saved_tensors_hooks``; a CPU proxy of activation memory:
  each saved tensor counted at its own size, shared storage counted again);
* LoRA: the gradient norm of every step before clipping.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback

HERE = Path(__file__).resolve().parent
TARGET = 7

#: gradient mode label -> CLI overrides
LATENT_MODES: dict[str, list[str]] = {
    "SDO": ["--model.gradient_mode", "ShortcutGradient"],
    "FullBackprop": ["--model.gradient_mode", "FullBackprop"],
    "DRTune(k=5)": ["--model.gradient_mode", "DRTune", "--model.gradient_mode.k", "5"],
}
LORA_MODES: dict[str, list[str]] = {
    "SDO": ["--model.gradient_mode", "ShortcutGradient"],
    "SDO unbiased": ["--model.gradient_mode", "ShortcutGradient", "--model.gradient_mode.scale", "unbiased"],
    "AlignProp-1 (K=1)": ["--model.gradient_mode", "TruncatedBackprop", "--model.gradient_mode.k", "1"],
    "AlignProp-uniform": ["--model.gradient_mode", "TruncatedBackprop", "--model.gradient_mode.random_k", "true"],
    "DRTune(k=5)": ["--model.gradient_mode", "DRTune", "--model.gradient_mode.k", "5"],
    "FullBackprop": ["--model.gradient_mode", "FullBackprop"],
}


class _Meter(Callback):
    """Bytes saved for backward per step (max over steps) and the pre-clipping gradient norms."""

    def __init__(self) -> None:
        self.current = 0
        self.peak = 0
        self.grad_norms: list[float] = []

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        self.current += t.numel() * t.element_size()
        return t

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.current = 0

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: torch.Tensor) -> None:
        self.peak = max(self.peak, self.current)

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        # Lightning calls this before it clips the gradients
        grads = [p.grad.norm() for p in pl_module.optimized_tensors() if p.grad is not None]
        if grads:
            self.grad_norms.append(torch.stack(grads).norm().item())


def judge() -> Any:
    """The independent judge of benchmarks/quickstart.py: ``DigitsJudge``, a logistic regression on raw pixels."""
    from sdo_lightning.digits.judge import DigitsJudge

    return DigitsJudge(image_size=16)


def judge_says(the_judge: Any, images: torch.Tensor) -> np.ndarray:
    """The digit the judge calls each image."""
    return the_judge.probabilities(images).argmax(-1).numpy()


def _fit(config: Path, overrides: list[str]) -> tuple[Any, _Meter, float, float]:
    from sdo_lightning.cli import main

    out = tempfile.mkdtemp(prefix="sdo_fidelity_")
    cli = main(["--config", str(config), *overrides, "--trainer.logger", "false", "--trainer.default_root_dir", out,
                "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"], run=False)
    meter = _Meter()
    cli.trainer.callbacks.append(meter)
    wall, cpu = time.perf_counter(), time.process_time()
    with torch.autograd.graph.saved_tensors_hooks(meter.pack, lambda t: t):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return cli.model, meter, time.perf_counter() - wall, time.process_time() - cpu


def latent_run(mode: str, seed: int, the_judge: Any, steps: int = 50) -> dict[str, Any]:
    """One quickstart run (x_T, 16 samples, 50-step DDIM) with gradient mode ``mode``."""
    module, meter, wall, cpu = _fit(HERE / "_fidelity_quickstart.yaml",
                                    [*LATENT_MODES[mode], "--seed_everything", str(seed), "--model.seed", str(seed),
                                     "--trainer.max_steps", str(steps)])
    images = module.best_images.detach().cpu()
    with torch.no_grad():
        prob = module.objective.objectives[0].classifier(images).softmax(-1)[:, TARGET].mean().item()
    said = judge_says(the_judge, images)
    return {"task": "latent", "mode": mode, "seed": seed, "steps": steps,
            "objective": module.best_loss.mean().item(), "target_prob": prob,
            "judge_target": float((said == TARGET).mean()), "wall_s": wall, "cpu_s": cpu,
            "saved_bytes": meter.peak}


@torch.no_grad()
def lora_samples(module: Any, count: int = 64, seed: int = 10_000) -> torch.Tensor:
    """``count`` samples of the fine-tuned model from noise seeds no training step used."""
    from sdo_lightning import sample

    backbone = module.backbone
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(count, *backbone.latent_shape, generator=gen)
    cond = backbone.encode_condition({"index": torch.arange(count)})
    return backbone.decode(sample(backbone.denoise, module.solver, x, cond, scheduler_config=backbone.scheduler_config))


def lora_run(mode: str, seed: int, the_judge: Any, steps: int = 100, clip: float | None = 1.0) -> dict[str, Any]:
    """One LoRA fine-tuning run of configs/digits/finetune_lora.yaml, ``steps`` steps, clipping ``clip``."""
    overrides = [*LORA_MODES[mode], "--seed_everything", str(seed), "--model.seed", str(seed),
                 "--trainer.max_steps", str(steps)]
    if clip is not None:
        overrides += ["--trainer.gradient_clip_val", str(clip)]
    module, meter, wall, cpu = _fit(HERE / "_fidelity_lora.yaml", overrides)
    images = lora_samples(module)
    with torch.no_grad():
        log_probs = module.objective.classifier(images).log_softmax(-1)[:, TARGET]
    said = judge_says(the_judge, images)
    norms = np.array(meter.grad_norms)
    return {"task": "lora", "mode": mode, "seed": seed, "steps": steps, "clip": clip,
            "objective": (-log_probs).mean().item(), "target_prob": log_probs.exp().mean().item(),
            "judge_target": float((said == TARGET).mean()), "wall_s": wall, "cpu_s": cpu,
            "saved_bytes": meter.peak, "grad_norm_median": float(np.median(norms)),
            "grad_norm_max": float(norms.max()), "clipped_share": float((norms > clip).mean()) if clip else 0.0}


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% confidence interval (Student t, n - 1 dof)."""
    from scipy import stats

    a = np.asarray(values, dtype=float)
    if len(a) < 2:
        return float(a.mean()), float("nan")
    return float(a.mean()), float(stats.t.ppf(0.975, len(a) - 1) * a.std(ddof=1) / np.sqrt(len(a)))


def run_all(task: str, modes: list[str], seeds: list[int], out: Path, steps: int | None = None,
            clip: float | None = 1.0) -> list[dict[str, Any]]:
    """Every (mode, seed) run of ``task`` (``latent`` or ``lora``); rows appended to ``out`` (JSON)
    as they finish, so a long run can be read while it goes on."""
    import json

    from tqdm.auto import tqdm

    the_judge = judge()
    rows: list[dict[str, Any]] = []
    for mode in tqdm(modes, desc=f"outcome {task}"):
        for seed in seeds:
            if task == "latent":
                row = latent_run(mode, seed, the_judge, steps or 50)
            else:
                row = lora_run(mode, seed, the_judge, steps or 100, clip)
            rows.append(row)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(rows, indent=1) + "\n")
    return rows


if __name__ == "__main__":  # one worker: python benchmarks/_fidelity_outcome.py latent|lora OUT.json [--modes ...] [--seeds ...]
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("task", choices=["latent", "lora"])
    parser.add_argument("out", type=Path)
    parser.add_argument("--modes", nargs="+")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    args = parser.parse_args()
    torch.set_num_threads(1)
    modes = args.modes or list(LATENT_MODES if args.task == "latent" else LORA_MODES)
    run_all(args.task, modes, args.seeds, args.out)
