"""Callbacks: a checkpoint when a run is interrupted, the results of a latent optimization, and
sample grids in TensorBoard."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

from sdo_lightning import atomic, progress
from sdo_lightning.images import make_grid, save_before_after, save_labelled_rows
from sdo_lightning.errors import NonFiniteError


class InterruptCheckpoint(Callback):
    """Write ``interrupted.ckpt`` in the log directory when a fit is interrupted (Ctrl-C) or
    stopped by a non-finite loss (``on_nonfinite: stop``), so nothing done so far is lost.

    The checkpoint holds the state after the last completed optimizer step (an interrupted step
    is redone on resume). Resume with ``sdo fit ... --ckpt_path last`` (the newest checkpoint of
    the run's log directory) or ``--ckpt_path <log dir>/interrupted.ckpt``. On by default in the
    ``sdo`` command; other exceptions write nothing, since the state may be inconsistent.

    Args:
        filename: name of the checkpoint file in the log directory.
    """

    def __init__(self, filename: str = "interrupted.ckpt") -> None:
        self.filename = filename
        self.path: Path | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # trainer.log_dir is a collective under DDP: resolve it here, on every process
        self.path = Path(trainer.log_dir or trainer.default_root_dir) / self.filename

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, (KeyboardInterrupt, NonFiniteError)) or self.path is None:
            return
        if trainer.state.fn != "fit" or trainer.lightning_module is None:
            return
        checkpoint = progress.dump_checkpoint(trainer)
        if trainer.global_rank == 0:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            trainer.strategy.checkpoint_io.save_checkpoint(checkpoint, self.path)
            rank_zero_info(
                f"{type(exception).__name__} at step {trainer.global_step}: checkpoint written to {self.path}; "
                "resume with --ckpt_path last (or that path)."
            )


class LatentResults(Callback):
    """At the end of a :class:`~sdo_lightning.LatentOptimization` fit, write what it reached to
    the log directory: ``before_after.png`` (the samples before, top, and after, bottom),
    ``samples.npz`` (``before`` and ``after``, ``(B, C, H, W)`` in [0, 1]) and ``summary.json``
    (each objective term before and after, the distance to the unoptimized samples); log the
    before/after images to TensorBoard and print the summary. Added by the module unless the
    trainer already has one. Under DDP process 0 writes.
    """

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if getattr(pl_module, "variable", None) is None:  # the fit failed before setup finished
            return
        summary = pl_module.summary()
        if trainer.global_rank == 0:
            self.write(summary, pl_module, Path(pl_module.log_dir), trainer.global_step)

    @staticmethod
    def write(summary: dict[str, Any], module: LightningModule, log_dir: Path, step: int) -> None:
        import numpy as np

        log_dir.mkdir(parents=True, exist_ok=True)
        before, after = module.initial_images.float().cpu(), module.best_images.float().cpu()
        with atomic.replacing(log_dir / "samples.npz") as tmp, open(tmp, "wb") as f:
            np.savez(f, before=before.numpy(), after=after.numpy())
        png = save_before_after(before, after, log_dir / "before_after.png")
        atomic.write_text(log_dir / "summary.json", json.dumps(summary, indent=2))
        experiment = getattr(module.logger, "experiment", None)
        if hasattr(experiment, "add_images"):
            experiment.add_images("before", before, step)
            experiment.add_images("after", after, step)
        lines = [f"{k}: {summary['before'][k]:.4g} -> {summary['after'][k]:.4g}" for k in summary["before"]]
        lines.append(f"mean L2 distance to the unoptimized samples: {summary['l2_to_unoptimized']:.4g}")
        rank_zero_info(
            "\n".join(["", "Results (before -> after, mean over samples):", *("  " + line for line in lines),
                       f"Logs: {log_dir}  (tensorboard --logdir {log_dir.parent})",
                       f"Images: {png}  and  {log_dir / 'samples.npz'}"])
        )


class SampleImages(Callback):
    """Log a grid of the training step's images (the first 16) to TensorBoard every
    ``every_n_steps`` optimizer steps, from what ``training_step`` returns under ``"images"``.
    :class:`~sdo_lightning.RewardFineTuning` adds one (every 50 steps) unless the trainer has one.

    Args:
        every_n_steps: log when the global step is a multiple of this.
    """

    def __init__(self, every_n_steps: int = 50) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}.")
        self.every_n_steps = every_n_steps

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._step = trainer.global_step  # the step these images belong to (counted up after its update)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        images = outputs.get("images") if isinstance(outputs, dict) else None
        experiment = getattr(pl_module.logger, "experiment", None)
        if images is None or self._step % self.every_n_steps != 0 or not hasattr(experiment, "add_image"):
            return
        experiment.add_image("samples", make_grid(images[:16].float().cpu()), self._step)


class PredictionWriter(Callback):
    """Write what ``sdo predict`` generated to the log directory: ``predictions.npz`` (``images``
    and, when sampled, ``base``: ``(N, C, H, W)`` in [0, 1]; ``seed``, ``class_label`` and
    ``prompt`` per row) and ``predict_grid.png`` (one labelled row per condition, the base model's
    row of the same seeds below it). Added by the modules unless the trainer has one. Under DDP
    each process writes its own rows (``predictions_rank<R>.npz``).

    Args:
        filename: the stem of the files (``<stem>.npz``; the grid is ``predict_grid.png``).
        nrow: images per grid row.
    """

    def __init__(self, filename: str = "predictions", nrow: int = 8) -> None:
        if nrow < 1:
            raise ValueError(f"nrow must be >= 1, got {nrow}.")
        self.filename = filename
        self.nrow = nrow
        self.outputs: list[dict[str, Any]] = []

    def on_predict_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.outputs = []

    def on_predict_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                             batch_idx: int, dataloader_idx: int = 0) -> None:
        if isinstance(outputs, dict) and "images" in outputs:
            self.outputs.append(outputs)

    def on_predict_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.outputs:
            return
        import numpy as np
        import torch

        rows = self.outputs
        arrays: dict[str, Any] = {"images": torch.cat([r["images"] for r in rows]).numpy(),
                                  "seed": torch.cat([r["seed"] for r in rows]).numpy()}
        if all("base" in r for r in rows):
            arrays["base"] = torch.cat([r["base"] for r in rows]).numpy()
        for key in ("class_label", "reference_class_label"):
            if all(key in r for r in rows):
                arrays[key] = torch.cat([r[key] for r in rows]).numpy()
        prompts = [p for r in rows for p in r.get("prompt", [])]
        if len(prompts) == len(arrays["seed"]):
            arrays["prompt"] = np.array(prompts)
        log_dir = Path(pl_module.log_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        suffix = f"_rank{trainer.global_rank}" if trainer.world_size > 1 else ""
        npz = log_dir / f"{self.filename}{suffix}.npz"
        with atomic.replacing(npz) as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)
        png = log_dir / f"predict_grid{suffix}.png"
        save_labelled_rows(self.grid_rows(arrays), png, nrow=self.nrow)
        self.outputs = []
        rank_zero_info(f"Predictions: {png}  and  {npz} ({len(arrays['seed'])} images)")

    @staticmethod
    def grid_rows(arrays: dict[str, Any]) -> list[tuple[str, Any]]:
        """``(label, images)`` per condition (prompt, else class), in the order first seen; the
        base model's images of the same seeds follow each as ``... (base)``."""
        import torch

        if "prompt" in arrays:
            names = [f"prompt {p!r}" for p in arrays["prompt"].tolist()]
        elif "class_label" in arrays:
            names = ["unconditional" if int(c) == 10 else f"class {int(c)}" for c in arrays["class_label"].tolist()]
        else:
            names = ["samples"] * len(arrays["seed"])
        out: list[tuple[str, Any]] = []
        for name in dict.fromkeys(names):
            rows = [i for i, n in enumerate(names) if n == name]
            seeds = arrays["seed"][rows]
            span = f"seeds {int(seeds.min())}-{int(seeds.max())}" if len(rows) > 1 else f"seed {int(seeds[0])}"
            out.append((f"{name}, {span}", torch.from_numpy(arrays["images"][rows])))
            if "base" in arrays:
                drawn = ""
                if "reference_class_label" in arrays:  # the base model's samples of another class
                    classes = sorted({int(c) for c in arrays["reference_class_label"][rows]})
                    drawn = ", " + ("unconditional" if classes == [10] else f"class {', '.join(map(str, classes))}")
                out.append((f"{name}, {span} (base model{drawn})", torch.from_numpy(arrays["base"][rows])))
        return out
