"""Reward reached against seconds: SDO, full backprop, best-of-N and zero-order search at equal time.

    python benchmarks/equal_time.py                       # digits DDPM and flow, 3 seeds, 30 CPU-s each
    python benchmarks/equal_time.py --seconds 60 --samples 16 --seeds 0 1 2 3 4
    python benchmarks/equal_time.py --tiny-sd             # smoke test: a tiny Stable Diffusion, 2 steps

Each run is the quickstart's LatentOptimization (``configs/quickstart.yaml`` for the digits DDPM,
``configs/digits/flow_quickstart.yaml`` for the rectified flow), parsed by the ``sdo`` CLI with only
``--model.gradient_mode``, ``--model.seed`` and the sample count changed, fitted in this process
by a Lightning Trainer until its clock reaches ``--seconds``. After every optimizer (or search)
step a callback records, with its own scoring time taken off the clock:

* ``seconds`` (the clock: CPU time of this process by default, ``--clock wall`` for wall time) and
  both ``process_s`` and ``wall_s``;
* ``best_loss``: the mean of the module's own lowest loss per sample (what it selects on; with the
  quickstart's augmented classifier a noisy score, so a method that scores more candidates finds
  lower noise draws: read it beside the next three);
* ``objective``: the objective re-scored on each sample's best image with the same augmentation
  draws for every method and step (a fixed seed);
* ``target_prob``: the shipped classifier's p(7) of the best images, without augmentation;
* ``judge_prob``: :class:`~sdo_lightning.digits.judge.DigitsJudge`'s p(7), a logistic regression on
  raw pixels the optimization never sees;
* ``l2``: the mean L2 distance of the best images to the unoptimized samples (the quickstart asks
  for a small change: best-of-N draws new samples, the gradient methods edit the given ones).

Methods: ``sdo`` (ShortcutGradient), ``full`` (FullBackprop), ``best_of_n`` (BestOfN, 4 fresh
noises per step and sample), ``zero_order`` (ZeroOrder, 4 perturbations of sigma 0.2 per step and
sample), ``sdo_white`` (SDO with ``StartNoise(white_noise: true)``: x_T back on white-noise statistics
after every step) and ``hybrid`` (``SearchThenGradient``: best-of-N for half the seconds, then SDO
from each sample's best). The hybrid runs once per budget of ``--budgets``: its ``max_steps`` and
``split`` come from the CPU seconds per step of the sdo and best_of_n runs of the same model and
seed, and each budget's column reads the run made for it. ``real_dist`` is the mean L2 distance of
the best images to the nearest real 7 of scikit-learn's digits (at 16 px): how far from the data. Truncated backprop (DRaFT-K, AlignProp) is not a method for a start noise: x_T is read by
the first network call only, so a truncation that keeps the last K < N calls gives it no gradient
(TruncatedBackprop refuses), and K = N is full backprop; ``--methods truncated`` runs
``TruncatedBackprop(k=N)`` to show that it costs what full backprop costs.

Timing: torch runs on ``--threads`` (default 1) threads, and the default clock is the process's
CPU time, because the machine this was measured on had its 2 cores shared with other jobs (wall
time then measures the neighbours); on an idle core the two agree. Writes ``--out``.json (every
trace) and ``--out``.png (reward against seconds, mean over seeds, min-max band; drawn with PIL), and prints a
markdown table at ``--budgets`` seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from lightning.pytorch import Callback, Trainer

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"ddpm": ROOT / "configs" / "quickstart.yaml", "flow": ROOT / "configs" / "digits" / "flow_quickstart.yaml"}
METHODS = {
    "sdo": ["--model.gradient_mode", "ShortcutGradient"],
    "full": ["--model.gradient_mode", "FullBackprop"],
    "truncated": ["--model.gradient_mode", "TruncatedBackprop"],  # k set to the solver's steps below
    "best_of_n": ["--model.gradient_mode", "BestOfN", "--model.gradient_mode.candidates", "4"],
    "zero_order": ["--model.gradient_mode", "ZeroOrder", "--model.gradient_mode.candidates", "4",
                   "--model.gradient_mode.sigma", "0.2"],
    # SDO with x_T projected onto white-noise statistics (then its norm shell) after every step
    "sdo_white": ["--model.gradient_mode", "ShortcutGradient", "--model.target", "StartNoise",
                  "--model.target.white_noise", "true"],
    # best-of-N (4 candidates) for HYBRID_SEARCH_TIME of the budget, then SDO steps from each sample's best;
    # run once per budget, its max_steps and split set from the seconds per step of the sdo and
    # best_of_n runs of the same model and seed (see hybrid_schedule)
    "hybrid": ["--model.gradient_mode", "SearchThenGradient", "--model.gradient_mode.search", "BestOfN",
               "--model.gradient_mode.search.candidates", "4"],
}
#: the share of a hybrid run's seconds spent searching
HYBRID_SEARCH_TIME = 0.5
RESCORE_SEED = 1234


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Clock(Callback):
    """Records the reward after every step against the run's clock (its own scoring time taken off),
    and stops the fit when the clock passes ``budget`` seconds or ``max_steps`` steps are done."""

    def __init__(self, budget: float, clock: str, judge: Any, classifier: Any, target: int,
                 real: Tensor | None = None) -> None:
        self.budget, self.clock, self.judge, self.classifier, self.target = budget, clock, judge, classifier, target
        self.real = real  # the real digits of the target class, flattened, for the nearest-real distance
        self.rows: list[dict[str, float]] = []

    def _score(self, module: Any, best_loss: float) -> dict[str, float]:
        from sdo_lightning import progress

        images = module.best_images
        batch = module.trainer.datamodule.full_batch(module.device)
        every = torch.arange(len(images), device=images.device)
        with progress.global_rng_unchanged(), torch.no_grad():
            torch.manual_seed(RESCORE_SEED)  # the same augmentation draws for every method and step
            latent = module.trajectory_inputs(every)[0]
            objective = module.objective(images, module.objective_batch(batch, every, latent)).mean().item()
            row = {"best_loss": best_loss, "objective": objective,
                   "judge_loss": self.judge(images, batch).mean().item(),
                   "l2": (images - module.initial_images).flatten(1).norm(dim=1).mean().item()}
            if self.classifier is not None:
                row["target_prob"] = self.classifier(images).softmax(-1)[:, self.target].mean().item()
                row["judge_prob"] = 1 - row["judge_loss"]
            if self.real is not None:  # how far the images are from the data: the L2 to the nearest real 7
                row["real_dist"] = torch.cdist(images.flatten(1).float(), self.real).min(dim=1).values.mean().item()
        return row

    def _now(self) -> tuple[float, float]:
        return time.process_time() - self._p0 - self._paused_p, time.perf_counter() - self._w0 - self._paused_w

    def on_train_start(self, trainer: Trainer, module: Any) -> None:
        self._paused_p = self._paused_w = 0.0
        self.rows = [{"step": 0, "process_s": 0.0, "wall_s": 0.0, "seconds": 0.0, **self._score(module, float("nan"))}]
        self._p0, self._w0 = time.process_time(), time.perf_counter()

    def on_train_batch_end(self, trainer: Trainer, module: Any, *args: Any) -> None:
        process_s, wall_s = self._now()
        p, w = time.process_time(), time.perf_counter()
        row = {"step": trainer.global_step, "process_s": process_s, "wall_s": wall_s,
               "seconds": process_s if self.clock == "process" else wall_s,
               **self._score(module, module.best_loss.mean().item())}
        self.rows.append(row)
        self._paused_p += time.process_time() - p
        self._paused_w += time.perf_counter() - w
        if row["seconds"] >= self.budget:
            trainer.should_stop = True


def _no_results() -> Callback:
    from sdo_lightning.training.callbacks import LatentResults

    class NoResults(LatentResults):
        """Stands in for the results writer: a benchmark run writes nothing."""

        def on_fit_end(self, trainer: Trainer, pl_module: Any) -> None:
            pass

    return NoResults()


def hybrid_schedule(budget: float, sdo_s: float, search_s: float) -> tuple[int, float]:
    """``(max_steps, split)`` of a hybrid run that searches for ``HYBRID_SEARCH_TIME`` of ``budget``
    seconds and takes SDO steps for the rest, from the seconds per step of a search and an SDO step."""
    searched = max(1, round(HYBRID_SEARCH_TIME * budget / search_s))
    stepped = max(1, round((1 - HYBRID_SEARCH_TIME) * budget / sdo_s))
    return searched + stepped, searched / (searched + stepped)


def digits_module(model: str, method: str, seed: int, samples: int, steps: int | None,
                  extra: list[str] = ()) -> tuple[Any, Any]:
    """The config's module and data module, as ``sdo fit`` builds them, with the method and seed set."""
    from _models import cli_parts

    args = ["--config", str(CONFIGS[model]), *METHODS[method], *extra, "--model.seed", str(seed),
            "--seed_everything", str(seed), "--data.num_samples", str(samples), "--trainer.logger", "false"]
    if steps is not None:
        args += ["--model.solver.num_inference_steps", str(steps)]
    if method == "truncated":
        args += ["--model.gradient_mode.k", str(steps or 50)]
    return cli_parts(args)


def tiny_sd_module(method: str, seed: int, samples: int, steps: int | None, root: Path) -> tuple[Any, Any, Any]:
    """The same LatentOptimization on a tiny random Stable Diffusion pipeline (sdo_lightning/testing/tiny_models.py),
    optimizing a tiny CLIP score; the judge is PickScore on a second tiny CLIP."""
    from sdo_lightning.testing import tiny_models

    from sdo_lightning.backbones import StableDiffusionBackbone
    from sdo_lightning.training.data import SampleSet
    from sdo_lightning.gradient_modes import FullBackprop, ShortcutGradient, TruncatedBackprop
    from sdo_lightning.modules.latent_optimization import LatentOptimization
    from sdo_lightning.objectives import CLIPScore, PickScore
    from sdo_lightning.searches import BestOfN, ZeroOrder
    from sdo_lightning.solvers import DDIM

    if not (root / "sd").is_dir():
        tiny_models.build_tiny_sd(root / "sd")
        tiny_models.build_tiny_clip(root / "clip")
        tiny_models.build_tiny_clip(root / "judge_clip", seed=1)
    n = steps or 2
    modes = {"sdo": ShortcutGradient(), "full": FullBackprop(), "truncated": TruncatedBackprop(k=n),
             "best_of_n": BestOfN(candidates=2), "zero_order": ZeroOrder(candidates=2)}
    module = LatentOptimization(objective=CLIPScore(str(root / "clip"), prompt="a cat"),
                                backbone=StableDiffusionBackbone(str(root / "sd"), guidance_scale=1.0),
                                solver=DDIM(n), gradient_mode=modes[method], seed=seed, lr=0.1)
    judge = PickScore(str(root / "judge_clip"), prompt="a cat")
    return module, SampleSet(num_samples=samples, prompt="a cat"), judge


def run(model: str, method: str, seed: int, args: argparse.Namespace, tmp: Path, budget: float | None = None,
        schedule: tuple[int, float] | None = None) -> list[dict[str, float]]:
    torch.manual_seed(seed)
    real = None
    if model == "tiny_sd":
        module, data, judge = tiny_sd_module(method, seed, args.samples, args.steps, tmp)
        classifier = None
    else:
        from sdo_lightning.digits import WEIGHTS_DIR, DigitClassifier
        from sdo_lightning.digits.data import load_digits_images
        from sdo_lightning.digits.judge import DigitsJudge

        extra = [] if schedule is None else ["--model.gradient_mode.split", str(schedule[1])]
        module, data = digits_module(model, method, seed, args.samples, args.steps, extra)
        judge = DigitsJudge(target_class=7, image_size=16)
        classifier = DigitClassifier.from_pretrained(WEIGHTS_DIR / "classifier").eval()
        images, labels = load_digits_images(16)
        real = images[labels == 7].flatten(1)
    clock = Clock(budget or args.seconds, args.clock, judge, classifier, target=7, real=real)
    max_steps = schedule[0] if schedule is not None else args.max_steps or 10**6
    trainer = Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp,
                      callbacks=[clock, _no_results()])
    trainer.fit(module, datamodule=data)
    return clock.rows


def at(rows: list[dict[str, float]], key: str, seconds: float) -> float:
    """``key`` of the last record at or before ``seconds`` on the run's clock (a step function)."""
    value = rows[0][key]
    for row in rows:
        if row["seconds"] > seconds:
            break
        value = row[key]
    return value


def table(results: dict[str, Any], budgets: list[float]) -> str:
    import numpy as np

    metrics = [k for k in ("objective", "target_prob", "judge_prob", "judge_loss", "l2", "real_dist")
               if k in results["runs"][0]["rows"][0]]
    if "judge_prob" in metrics:
        metrics.remove("judge_loss")
    head = ["model", "method", "steps"] + [f"{m} @ {b:g} s" for b in budgets for m in metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    keys = sorted({(r["model"], r["method"]) for r in results["runs"]}, key=lambda k: (k[0], list(METHODS).index(k[1])))
    for model, method in keys:
        runs = [r["rows"] for r in results["runs"] if (r["model"], r["method"]) == (model, method)
                and r.get("budget") in (None, max(budgets))]
        steps = np.mean([r[-1]["step"] for r in runs])
        cells = [model, method, f"{steps:.0f}"]
        for b in budgets:
            # a hybrid's schedule depends on its budget: each budget reads the run made for it
            at_b = [r["rows"] for r in results["runs"] if (r["model"], r["method"]) == (model, method)
                    and r.get("budget") in (None, b)]
            for m in metrics:
                values = np.array([at(rows, m, b) for rows in at_b])
                cells.append(f"{values.mean():.3f} ± {values.std():.3f}" if len(values) > 1 else f"{values.mean():.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


COLORS = {"sdo": (31, 119, 180), "full": (255, 127, 14), "truncated": (148, 103, 189), "best_of_n": (44, 160, 44),
          "zero_order": (214, 39, 40), "sdo_white": (23, 190, 207), "hybrid": (0, 0, 0)}


def _panel(draw: Any, box: tuple[int, int, int, int], title: str, xlabel: str, curves: list[tuple[str, Any, Any, Any]],
           horizon: float, legend: str = "upper right") -> None:
    """One line plot in ``box`` (left, top, right, bottom) of a PIL image: each curve is
    ``(method, mean, low, high)`` over the time grid, its min-max band drawn light."""
    import numpy as np

    left, top, right, bottom = box
    x0, x1, y0, y1 = left + 52, right - 10, top + 22, bottom - 34
    lo = min(float(np.min(c[2])) for c in curves)
    hi = max(float(np.max(c[3])) for c in curves)
    pad = 0.05 * (hi - lo or 1.0)
    lo, hi = lo - pad, hi + pad

    def xy(t: float, v: float) -> tuple[float, float]:
        return x0 + (x1 - x0) * t / horizon, y1 - (y1 - y0) * (v - lo) / (hi - lo)

    draw.rectangle([x0, y0, x1, y1], outline=(0, 0, 0))
    for k in range(5):  # ticks and grid
        v = lo + (hi - lo) * k / 4
        t = horizon * k / 4
        draw.line([xy(0, v), xy(horizon, v)], fill=(225, 225, 225))
        draw.text((left + 4, xy(0, v)[1] - 5), f"{v:.2f}", fill=(0, 0, 0))
        draw.text((xy(t, lo)[0] - 8, y1 + 4), f"{t:.0f}", fill=(0, 0, 0))
    draw.text((x0, top + 4), title, fill=(0, 0, 0))
    draw.text(((x0 + x1) // 2 - 3 * len(xlabel), y1 + 18), xlabel, fill=(0, 0, 0))
    grid = np.linspace(0, horizon, len(curves[0][1]))
    for method, mean, low, high in curves:
        color = COLORS[method]
        light = tuple(int(c + (255 - c) * 0.8) for c in color)
        for t, a, b in zip(grid, low, high):
            draw.line([xy(t, a), xy(t, b)], fill=light, width=2)
    for method, mean, low, high in curves:
        draw.line([xy(t, v) for t, v in zip(grid, mean)], fill=COLORS[method], width=2)
    for k, (method, *_rest) in enumerate(curves):  # legend, where the curves leave room
        y = (y1 - 6 - 13 * (len(curves) - k)) if legend.startswith("lower") else (y0 + 6 + 13 * k)
        x = x0 + 10 if legend.endswith("left") else x1 - 120
        draw.line([(x, y + 5), (x + 20, y + 5)], fill=COLORS[method], width=3)
        draw.text((x + 25, y), method, fill=(0, 0, 0))


def plot(results: dict[str, Any], path: Path) -> None:
    """Reward against seconds, one panel per model and metric, one curve per method (mean over
    seeds, min-max band), drawn with PIL (no plotting library needed)."""
    import numpy as np
    from PIL import Image, ImageDraw

    models = list(dict.fromkeys(r["model"] for r in results["runs"]))
    metrics = [m for m in ("objective", "judge_prob", "judge_loss", "l2", "real_dist") if m in results["runs"][0]["rows"][0]]
    if "judge_prob" in metrics:
        metrics.remove("judge_loss")
    labels = {"objective": "objective, re-scored (lower is better)", "judge_prob": "independent judge p(7) (higher is better)",
              "judge_loss": "judge loss (lower is better)", "l2": "L2 to the unoptimized samples",
              "real_dist": "L2 to the nearest real 7"}
    horizon = min(results["seconds"], max(row["seconds"] for r in results["runs"] for row in r["rows"]))
    grid = np.linspace(0, horizon, 240)
    width, height = 460, 300
    image = Image.new("RGB", (width * len(metrics), height * len(models)), "white")
    draw = ImageDraw.Draw(image)
    xlabel = "CPU seconds (1 thread)" if results["clock"] == "process" else "wall seconds"
    for i, model in enumerate(models):
        for j, metric in enumerate(metrics):
            curves = []
            for method in METHODS:
                runs = [r["rows"] for r in results["runs"] if (r["model"], r["method"]) == (model, method)
                        and r.get("budget") in (None, results["seconds"])]
                if runs:
                    values = np.array([[at(rows, metric, t) for t in grid] for rows in runs])
                    curves.append((method, values.mean(0), values.min(0), values.max(0)))
            seeds = len({r["seed"] for r in results["runs"]})
            _panel(draw, (j * width, i * height, (j + 1) * width, (i + 1) * height),
                   f"{model}: {labels[metric]}, {seeds} seeds", xlabel, curves, horizon,
                   legend={"judge_prob": "lower right", "l2": "upper left"}.get(metric, "upper right"))
    image.save(path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["ddpm", "flow"], choices=[*CONFIGS, "tiny_sd"])
    parser.add_argument("--methods", nargs="+", default=["sdo", "full", "best_of_n", "zero_order"], choices=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--seconds", type=float, default=30.0, help="each run's budget on the clock")
    parser.add_argument("--budgets", nargs="+", type=float, default=None,
                        help="seconds at which the table reports (default: a quarter, half and all of --seconds)")
    parser.add_argument("--samples", type=int, default=8, help="samples optimized per run (the quickstart has 16)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: the config's 50)")
    parser.add_argument("--max-steps", type=int, default=None, help="stop each run after this many optimizer steps too")
    parser.add_argument("--clock", choices=["process", "wall"], default="process")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tiny-sd", action="store_true",
                        help="smoke test: a tiny random Stable Diffusion built in code, 2 sampling steps, 2 optimizer steps")
    parser.add_argument("--out", default=str(ROOT / "docs" / "equal_time"), help="writes OUT.json and OUT.png")
    args = parser.parse_args(argv)
    if args.tiny_sd:
        args.models, args.steps = ["tiny_sd"], args.steps or 2
        args.max_steps = args.max_steps or 2
        args.samples = min(args.samples, 2)
    torch.set_num_threads(args.threads)
    budgets = args.budgets or [args.seconds / 4, args.seconds / 2, args.seconds]

    import warnings

    from tqdm.auto import tqdm

    warnings.filterwarnings("ignore", message=r".*(eval mode|IterableDataset|val_dataloader|LeafSpec).*")
    results: dict[str, Any] = {"seconds": args.seconds, "clock": args.clock, "threads": args.threads,
                               "samples": args.samples, "steps": args.steps or 50, "runs": []}
    if "hybrid" in args.methods and not {"sdo", "best_of_n"} <= set(args.methods):
        parser.error("--methods hybrid needs sdo and best_of_n too (its schedule comes from their seconds per step)")
    # the hybrid last: its schedule reads the sdo and best_of_n runs of the same model and seed
    methods = sorted(args.methods, key=lambda k: k == "hybrid")
    jobs = [(m, k, s, b) for m in args.models for k in methods for s in args.seeds
            for b in (budgets if k == "hybrid" else [None])]
    start = time.perf_counter()

    def per_step(model: str, method: str, seed: int) -> float:
        (rows,) = [r["rows"] for r in results["runs"] if (r["model"], r["method"], r["seed"]) == (model, method, seed)]
        return rows[-1]["seconds"] / rows[-1]["step"]

    with tempfile.TemporaryDirectory() as tmp:
        for model, method, seed, budget in tqdm(jobs, desc="runs"):
            schedule = None
            if method == "hybrid":
                schedule = hybrid_schedule(budget, per_step(model, "sdo", seed), per_step(model, "best_of_n", seed))
            rows = run(model, method, seed, args, Path(tmp), budget=budget, schedule=schedule)
            results["runs"].append({"model": model, "method": method, "seed": seed, "rows": rows,
                                    **({"budget": budget, "schedule": schedule} if budget is not None else {})})
            last = rows[-1]
            log(f"{model} {method} seed {seed}: {last['step']} steps in {last['process_s']:.1f} CPU-s "
                f"({last['wall_s']:.1f} wall-s), objective {rows[0]['objective']:.3f} -> {last['objective']:.3f}"
                + (f", judge p(7) {rows[0]['judge_prob']:.3f} -> {last['judge_prob']:.3f}" if "judge_prob" in last else ""))
    results["total_wall_s"] = time.perf_counter() - start
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    plot(results, out.with_suffix(".png"))
    print(table(results, budgets))
    log(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')} ({results['total_wall_s']:.0f} s in all)")
    return results


if __name__ == "__main__":
    main()
