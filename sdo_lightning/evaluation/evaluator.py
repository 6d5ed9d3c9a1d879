"""The evaluator: what ``sdo validate`` / ``test`` / ``predict`` and validation during a fit do
for an optimization module.

A module makes the images (``generate_for_eval``), the unoptimized reference of the same rows
(``generate_reference``) and the batch its objectives see (``eval_batch``); the
:class:`Evaluator` it holds scores them, accumulates the metrics over the rows, logs them with a
grid of images to TensorBoard and writes ``<stage>_metrics.json`` outside a fit. Its state is
kept out of checkpoints (it is rebuilt from the rows).
"""

from __future__ import annotations

import json
from typing import Any

import torch
from lightning.pytorch import Callback
from torch import Tensor

from sdo_lightning import atomic, progress
from sdo_lightning.evaluation.metrics import Evaluation, SampleMetrics
from sdo_lightning.images import make_grid
from sdo_lightning.training.callbacks import PredictionWriter
from sdo_lightning.training.rows import batch_rows



def check_finite_images(images: Tensor, batch: dict[str, Any]) -> None:
    """Refuse images holding NaN or infinite pixels (weights of a diverged fit), naming a row."""
    bad = (~torch.isfinite(images.flatten(1))).any(1)
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        seed = f" (seed {int(batch['seed'][row])})" if "seed" in batch else ""
        raise ValueError(f"{int(bad.sum())} of {len(images)} generated images hold NaN or infinite pixels, e.g. row "
                         f"{row}{seed}: the adapter or checkpoint holds weights of a diverged fit; use an earlier "
                         "checkpoint, or fit again with a lower lr.")

class Evaluator:
    """Scores, accumulates and logs a module's evaluation rows; one per module.

    Attributes:
        metrics: the metrics being accumulated (built at the first evaluated batch, from the
            module's ``evaluation`` settings); not a submodule, so not in checkpoints.
        reference_cache: the unoptimized images of the rows seen, by (seed, class, prompt), on the CPU.
        grid: this evaluation's images for the TensorBoard grid.
        base_grid: the reference images of the same rows.
        base_logged: the stages (``val``, ``test``) whose reference grid was logged (it never changes).
        last_metrics: the values of the last finished evaluation.
    """

    def __init__(self) -> None:
        self.metrics: SampleMetrics | None = None
        self.reference_cache: dict[Any, Tensor] = {}
        self.grid: list[Tensor] = []
        self.base_grid: list[Tensor] = []
        self.base_logged: set[str] = set()
        self.last_metrics: dict[str, float] | None = None

    def build_metrics(self, module: Any, channels: int = 1) -> SampleMetrics:
        if self.metrics is None:
            # plain tensors, whichever mode the first evaluation runs in; building networks draws their
            # initial weights from the global generators, which the training's draws must not see
            with torch.inference_mode(False), progress.global_rng_unchanged():
                settings = module.evaluation
                metrics = settings.build(channels) if isinstance(settings, Evaluation) else SampleMetrics()
            self.metrics = metrics.to(module.device)
        return self.metrics

    def reference_images(self, module: Any, batch: dict[str, Any]) -> Tensor | None:
        """The module's ``generate_reference`` of ``batch``'s rows, each computed once (keyed by its
        seed and condition) and kept on the CPU."""
        cache = self.reference_cache
        n = len(batch["seed"])
        labels = batch.get("reference_class_label", batch.get("class_label"))
        keys = [(int(s), None if labels is None else int(c), p) for s, c, p in zip(
            batch["seed"].tolist(), [0] * n if labels is None else labels.tolist(), batch.get("prompt") or [None] * n)]
        todo = [i for i, key in enumerate(keys) if key not in cache]
        if todo:
            with progress.global_rng_unchanged():
                made = module.generate_reference(batch_rows(batch, torch.tensor(todo)))
            if made is None:
                return None
            for i, image in zip(todo, made.detach().float().cpu()):
                cache[keys[i]] = image
        return torch.stack([cache[key] for key in keys]).to(module.device)

    def evaluate_batch(self, module: Any, batch: dict[str, Any]) -> Tensor:
        """Generate, score and accumulate the rows ``batch``; returns their images."""
        with progress.global_rng_unchanged():  # validation during fit must not shift the training draws
            images = module.generate_for_eval(batch)
            reference = self.reference_images(module, batch)
            scored = module.eval_batch(batch, images, reference)
            losses = module.objective(images, scored)
            held = getattr(module, "held_out_objective", None)
            held_out = held(images, scored) if held is not None else None
        self.build_metrics(module, images.shape[1]).update(images, reference, losses, held_out, batch)
        if sum(len(g) for g in self.grid) < self._grid_size(module):
            self.grid.append(images.detach().float().cpu())
            if reference is not None:
                self.base_grid.append(reference.detach().float().cpu())
        return images

    @staticmethod
    def _grid_size(module: Any) -> int:
        return module.evaluation.grid_size if module.evaluation is not None else 64

    def finish(self, module: Any, prefix: str) -> dict[str, float] | None:
        """Compute, log (``<prefix>/<name>``) and reset the metrics of the evaluation that ends; write
        ``<prefix>_metrics.json`` outside a fit. None when nothing was evaluated."""
        metrics = self.metrics
        if metrics is None:
            return None
        values = metrics.compute()
        metrics.reset()
        shown = {k: v for k, v in values.items() if not k.startswith("class_") or k == "class_entropy"}
        for name, value in shown.items():
            module.log(f"{prefix}/{name}", float(value))
        self.last_metrics = values
        limit = self._grid_size(module)
        grid, base = self.grid, self.base_grid
        self.grid, self.base_grid = [], []
        trainer = module._trainer
        experiment = getattr(module.logger, "experiment", None) if trainer is not None else None
        if grid and hasattr(experiment, "add_image"):
            # the step Lightning logs this validation's scalars at, so the slider lines up with them
            step = getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", trainer.global_step) \
                if trainer.state.fn == "fit" else trainer.global_step
            experiment.add_image(f"{prefix}/samples", make_grid(torch.cat(grid)[:limit]), step)
            if base and prefix not in self.base_logged:  # the same every time: once
                experiment.add_image(f"{prefix}/base_samples", make_grid(torch.cat(base)[:limit]), step)
                self.base_logged.add(prefix)
        if module.global_rank == 0 and module.log_dir is not None and trainer.state.fn != "fit":
            atomic.write_text(module.log_dir / f"{prefix}_metrics.json", json.dumps(values, indent=2) + "\n")
        return values

    def predict(self, module: Any, batch: dict[str, Any]) -> dict[str, Any]:
        """The images of the rows ``batch`` (and the unoptimized model's, unless
        ``evaluation.predict_base`` is off), with the rows' seeds and conditions."""
        with progress.global_rng_unchanged():
            out: dict[str, Any] = {"images": module.generate_for_eval(batch).detach().float().cpu()}
            check_finite_images(out["images"], batch)
            if module.evaluation is None or module.evaluation.predict_base:
                reference = self.reference_images(module, batch)
                if reference is not None:
                    out["base"] = reference.float().cpu()
        out["seed"] = batch["seed"].cpu()
        for key in ("class_label", "reference_class_label"):
            if key in batch:
                out[key] = batch[key].cpu()
        if batch.get("prompt") is not None:
            out["prompt"] = list(batch["prompt"])
        return out

    @staticmethod
    def callbacks(trainer: Any) -> list[Callback]:
        """What validation and predict need unless the trainer has its own: a :class:`PredictionWriter`."""
        if any(isinstance(cb, PredictionWriter) for cb in trainer.callbacks):
            return []
        return [PredictionWriter()]

    def log_hparams(self, module: Any, params: dict[str, Any]) -> None:
        """Put ``params`` in TensorBoard's HParams tab beside the last evaluation's numbers
        (``hp/<name>``), or the last training loss when nothing was evaluated."""
        logger = module.logger if module._trainer is not None else None
        if logger is None or module.global_rank != 0:
            return
        values = self.last_metrics or {}
        metrics = {f"hp/{k}": float(v) for k, v in values.items() if not k.startswith("class_") or k == "class_entropy"}
        loss = module.trainer.callback_metrics.get("train/loss")
        if loss is not None:
            metrics["hp/train_loss"] = float(loss)
        clean = {k: v if v is None or isinstance(v, (bool, int, float, str)) else str(v) for k, v in params.items()}
        from lightning.pytorch.loggers import TensorBoardLogger

        if isinstance(logger, TensorBoardLogger):  # its HParams tab pairs the settings with the metrics
            logger.log_hyperparams(clean, metrics=metrics or None)
        else:  # CSV, W&B, MLflow: log_hyperparams(params) only
            logger.log_hyperparams(clean)
            if metrics:
                logger.log_metrics(metrics, step=module.trainer.global_step)
