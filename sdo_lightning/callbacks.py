"""Callbacks that keep a run's work: a checkpoint when it is interrupted."""

from __future__ import annotations

from pathlib import Path
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

from sdo_lightning import progress
from sdo_lightning.module_base import NonFiniteError


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
