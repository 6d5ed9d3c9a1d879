"""Picard (ParaDiGMS) sampling against sequential sampling along whole quickstart runs.

    python benchmarks/picard.py [--models ddpm flow] [--variants sequential warm cold] [--steps 50]
        [--cold-steps 10] [--tolerance 0.1] [--window 10] [--out picard.json]

Each variant fits the quickstart config's LatentOptimization in this process, as ``sdo fit`` builds
it (configs/quickstart.yaml: 16 samples, DDIM 50 steps, 50 Adam steps, lr 0.05;
configs/digits/flow_quickstart.yaml: the same on the flow model with 50 Euler steps), with the
solver as the config says (``sequential``) or wrapped in :class:`~sdo_lightning.sampling.picard.Picard`
started cold every step (``cold``) or from the previous step's trajectory of each sample
(``warm``). Per optimizer step it records the sweeps, the sequential rounds of network calls
(sequential: N; Picard: the sweeps plus the kept call), the network evaluations (one per sample
and step) and the step's wall and process seconds (the CPU may be shared: process time is the
CPU time this process got). At the end: the final objective of the best images (fixed
augmentation draws), the shipped classifier's p(7), and the independent judge (DigitsJudge, a
logistic regression on raw pixels the optimization never saw): the share of samples it calls a 7.
It also times one no-grad sequential sampling pass of the same 16 samples, the floor a warm SDO
step is compared with. Prints a markdown table; --out writes the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, Trainer

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"ddpm": ROOT / "configs" / "quickstart.yaml", "flow": ROOT / "configs" / "digits" / "flow_quickstart.yaml"}
RESCORE_SEED = 1234


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build(model: str) -> tuple[Any, Any]:
    """The config's module and data module, as ``sdo fit`` builds them."""
    from _models import cli_parts

    return cli_parts(["--config", str(CONFIGS[model]), "--trainer.logger", "false"])


class Record(Callback):
    """Per optimizer step: the Picard counters (or the sequential loop's), wall and process seconds
    of the step and of its gradient (forward and backward); with ``interleave``, right after each
    step also a no-grad sequential sampling pass and a sequential SDO gradient of the same variable,
    so the three are timed under the same load of a shared CPU."""

    def __init__(self, picard: Any, sink: Any, label: str, interleave: bool = False) -> None:
        self.picard, self.sink, self.label, self.interleave = picard, sink, label, interleave
        self.rows: list[dict[str, Any]] = []

    def on_train_batch_start(self, trainer: Trainer, module: Any, *args: Any) -> None:
        self._w, self._p = time.perf_counter(), time.process_time()

    def on_after_backward(self, trainer: Trainer, module: Any) -> None:
        self._grad = (time.perf_counter() - self._w, time.process_time() - self._p)

    def _sequential_gradient(self, module: Any, batch: dict[str, Any]) -> tuple[float, float]:
        from sdo_lightning import progress

        saved_grad, solver = module.variable.grad, module.solver
        module.solver = self.picard.solver
        try:  # the objective's augmentation draws are put back: the run continues as without it
            with progress.global_rng_unchanged():
                w, p = time.perf_counter(), time.process_time()
                _, losses = module.compute_losses(batch)
                losses.sum().backward()
                return time.perf_counter() - w, time.process_time() - p
        finally:
            module.solver = solver
            module.variable.grad = saved_grad

    def on_train_batch_end(self, trainer: Trainer, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        wall, cpu = time.perf_counter() - self._w, time.process_time() - self._p
        extra = {"grad_wall_s": round(self._grad[0], 3), "grad_process_s": round(self._grad[1], 3)}
        if self.interleave and self.picard is not None:
            solver = module.solver
            module.solver = self.picard.solver
            try:
                floor = sampling_pass(module)
            finally:
                module.solver = solver
            seq_wall, seq_cpu = self._sequential_gradient(module, batch)
            extra.update({"pass_wall_s": floor["wall_s"], "pass_process_s": floor["process_s"],
                          "seq_grad_wall_s": round(seq_wall, 3), "seq_grad_process_s": round(seq_cpu, 3)})
        n, b = module.solver.num_inference_steps, len(module.variable)
        if self.picard is None:
            row = {"sweeps": 0, "rounds": n, "evaluations": n * b, "warm": 0}
        else:
            last = self.picard.last
            row = {"sweeps": last.sweeps, "rounds": last.rounds, "evaluations": last.evaluations, "warm": last.warm}
        row = {"variant": self.label, "step": trainer.global_step, **row, "wall_s": round(wall, 3),
               "process_s": round(cpu, 3), **extra}
        self.rows.append(row)
        self.sink.write(json.dumps(row) + "\n")
        self.sink.flush()


def _no_results() -> Callback:
    from sdo_lightning.training.callbacks import LatentResults

    class NoResults(LatentResults):
        def on_fit_end(self, trainer: Trainer, pl_module: Any) -> None:
            pass

    return NoResults()


@torch.no_grad()
def score(module: Any, datamodule: Any) -> dict[str, float]:
    from sdo_lightning import progress
    from sdo_lightning.digits import WEIGHTS_DIR, DigitClassifier
    from sdo_lightning.digits.judge import DigitsJudge

    images = module.best_images
    batch = datamodule.full_batch(module.device)
    every = torch.arange(len(images), device=images.device)
    with progress.global_rng_unchanged():
        torch.manual_seed(RESCORE_SEED)  # the same augmentation draws for every variant
        latent = module.trajectory_inputs(every)[0]
        objective = module.objective(images, module.objective_batch(batch, every, latent)).mean().item()
    classifier = DigitClassifier.from_pretrained(WEIGHTS_DIR / "classifier").eval()
    judge = DigitsJudge(image_size=16)
    return {"objective": round(objective, 4),
            "p7": round(classifier(images).softmax(-1)[:, 7].mean().item(), 3),
            "judge_7": round((judge.probabilities(images).argmax(-1) == 7).double().mean().item(), 3)}


def sampling_pass(module: Any) -> dict[str, float]:
    """One no-grad sequential sampling pass of the module's samples (its current variable)."""
    from sdo_lightning.sampling import sample

    every = torch.arange(len(module.variable))
    x, cond = module.trajectory_inputs(every)
    with torch.no_grad():
        w, p = time.perf_counter(), time.process_time()
        sample(module.backbone.denoise, module.solver, x, cond, scheduler_config=module.backbone.scheduler_config)
        return {"wall_s": round(time.perf_counter() - w, 3), "process_s": round(time.process_time() - p, 3)}


def run(model: str, variant: str, steps: int, args: argparse.Namespace, sink: Any) -> dict[str, Any]:
    from sdo_lightning.sampling.picard import Picard

    torch.manual_seed(0)
    module, data = build(model)
    picard = None
    if variant != "sequential":
        picard = Picard(module.solver, tolerance=args.tolerance, window=args.window, warm_start=variant == "warm")
        module.solver = picard
    record = Record(picard, sink, f"{model}/{variant}", interleave=args.interleave)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp,
                          callbacks=[record, _no_results()])
        trainer.fit(module, datamodule=data)
    out = {"model": model, "variant": variant, "optimizer_steps": steps, "rows": record.rows, **score(module, data)}
    out["best_images"] = module.best_images.detach().clone()
    if variant == "sequential":
        out["sampling_pass"] = sampling_pass(module)
    return out


def summarize(result: dict[str, Any], reference: dict[str, Any] | None) -> dict[str, Any]:
    rows = result["rows"]
    later = rows  # every step (the first warm step starts from the prepared samples)

    def mean(key: str, of: list[dict[str, Any]]) -> float:
        return sum(r[key] for r in of) / len(of)

    out = {"model": result["model"], "variant": result["variant"], "steps": len(rows),
           "sweeps": round(mean("sweeps", later), 2), "rounds": round(mean("rounds", later), 2),
           "evaluations": round(mean("evaluations", later)), "wall_s": round(mean("wall_s", later), 2),
           "process_s": round(mean("process_s", later), 2), "grad_process_s": round(mean("grad_process_s", later), 2),
           "objective": result["objective"], "p7": result["p7"],
           "judge_7": result["judge_7"]}
    if "pass_process_s" in rows[0]:
        for key in ("pass_wall_s", "pass_process_s", "seq_grad_wall_s", "seq_grad_process_s", "grad_wall_s"):
            out[key] = round(mean(key, later), 2)
    if reference is not None and reference is not result:
        diff = (result["best_images"] - reference["best_images"]).abs()
        out["image_diff_vs_sequential"] = f"{float(diff.mean()):.4f} / {float(diff.max()):.3f}"
    return out


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Sequential rounds of network calls per optimizer step, one panel per model (PIL)."""
    from PIL import Image, ImageDraw

    models = sorted({r["variant"].split("/")[0] for r in rows})
    colors = {"sequential": (90, 90, 90), "warm": (200, 60, 40), "cold": (40, 90, 200)}
    width, height, pad = 420, 300, 48
    image = Image.new("RGB", (width * len(models), height), "white")
    draw = ImageDraw.Draw(image)
    top = max(r["rounds"] for r in rows) * 1.1
    for k, model in enumerate(models):
        x0 = k * width
        steps = max(r["step"] for r in rows if r["variant"].startswith(model + "/"))

        def xy(step: float, value: float) -> tuple[float, float]:
            return (x0 + pad + (step - 1) / max(steps - 1, 1) * (width - 2 * pad),
                    height - pad - value / top * (height - 2 * pad))

        draw.rectangle([x0 + pad, pad, x0 + width - pad, height - pad], outline=(0, 0, 0))
        draw.text((x0 + pad, 12), f"{model}: sequential rounds per optimizer step", fill=(0, 0, 0))
        for value in (0, 10, 20, 30, 40, 50):
            draw.text((x0 + 14, xy(1, value)[1] - 6), str(value), fill=(0, 0, 0))
        draw.text((x0 + width // 2 - 40, height - 30), f"optimizer step (1-{steps})", fill=(0, 0, 0))
        for j, (variant, color) in enumerate(colors.items()):
            points = [xy(r["step"], r["rounds"]) for r in rows if r["variant"] == f"{model}/{variant}"]
            if len(points) > 1:
                draw.line(points, fill=color, width=2)
            draw.text((x0 + width - pad - 70, pad + 6 + 14 * j), variant, fill=color)
    image.save(path)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["ddpm", "flow"], choices=list(CONFIGS))
    parser.add_argument("--variants", nargs="+", default=["sequential", "warm", "cold"],
                        choices=["sequential", "warm", "cold"])
    parser.add_argument("--steps", type=int, default=50, help="optimizer steps of the sequential and warm runs")
    parser.add_argument("--cold-steps", type=int, default=10, help="optimizer steps of the cold runs (each costs the same)")
    parser.add_argument("--tolerance", type=float, default=0.1)
    parser.add_argument("--window", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--interleave", action="store_true",
                        help="after each Picard step also time a sampling pass and a sequential SDO gradient")
    parser.add_argument("--out", default=None, help="write the summary and every step as JSON here")
    parser.add_argument("--plot", default=None, help="draw the rounds per step into this PNG")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    import warnings

    warnings.filterwarnings("ignore")
    summaries, results = [], []
    sink = open(args.out + ".steps.jsonl", "a") if args.out else open(os.devnull, "w")
    for model in args.models:
        reference = None
        for variant in args.variants:
            steps = args.cold_steps if variant == "cold" else args.steps
            log(f"{model}/{variant}: {steps} optimizer steps")
            result = run(model, variant, steps, args, sink)
            if variant == "sequential":
                reference = result
            results.append(result)
            summaries.append(summarize(result, reference if reference and reference["optimizer_steps"] == steps else None))
            if "sampling_pass" in result:
                summaries[-1]["sampling_pass_wall_s"] = result["sampling_pass"]["wall_s"]
                summaries[-1]["sampling_pass_process_s"] = result["sampling_pass"]["process_s"]
            log(json.dumps(summaries[-1]))
    sink.close()
    keys = ["model", "variant", "steps", "sweeps", "rounds", "evaluations", "wall_s", "process_s", "grad_process_s",
            "objective", "p7", "judge_7", "image_diff_vs_sequential", "pass_process_s", "seq_grad_process_s"]
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in summaries:
        print("| " + " | ".join(str(row.get(k, "")) for k in keys) + " |")
    if args.plot:
        plot([row for r in results for row in r["rows"]], Path(args.plot))
    if args.out:
        clean = [{k: v for k, v in r.items() if k != "best_images"} for r in results]
        Path(args.out).write_text(json.dumps({"args": vars(args), "summary": summaries, "runs": clean}, indent=1))
    return summaries


if __name__ == "__main__":
    main()
