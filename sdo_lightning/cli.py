"""The ``sdo`` command: a LightningCLI, plus ``sdo plugins``.

    sdo fit --config configs/quickstart.yaml      # optimize (LightningCLI's fit)
    sdo fit --help / --print_config               # every option, from the docstrings
    sdo plugins                                   # registered objectives, solvers, gradient modes
    sdo mix --adapters DIR [DIR ...] --scales 0 0.5 1   # sample with LoRA adapters at several scales
"""

from __future__ import annotations

import sys
from typing import Any

from jsonargparse import lazy_instance
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger

from sdo_lightning import registry

TRAINER_DEFAULTS: dict[str, Any] = {
    "max_steps": 50,
    "log_every_n_steps": 1,
    "num_sanity_val_steps": 0,
    "enable_model_summary": False,
    # tqdm counts optimizer steps plainly (rich shows "Epoch 0/-2" when only max_steps is set)
    "callbacks": [lazy_instance(TQDMProgressBar)],
    "logger": lazy_instance(TensorBoardLogger, save_dir="runs"),
}


class SDOCLI(LightningCLI):
    """LightningCLI with the project's modules and plugins importable by class name."""


def _import_modules() -> None:
    # Importing registers the LightningModules and data modules for short class names in YAML.
    import sdo_lightning.data  # noqa: F401
    import sdo_lightning.latent_optimization  # noqa: F401
    import sdo_lightning.reward_finetuning  # noqa: F401


def main(args: list[str] | None = None, run: bool = True) -> SDOCLI | None:
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] == ["plugins"]:
        registry.load_plugins()
        print(registry.format_table(registry.registered()))
        return None
    if argv[:1] == ["mix"]:
        from sdo_lightning.mix import mix

        mix(argv[1:])
        return None
    registry.load_plugins()
    _import_modules()
    return SDOCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=None if args is None else argv,
        run=run,
        trainer_defaults=TRAINER_DEFAULTS,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )


def console_main() -> None:
    """Entry point of the ``sdo`` console script (returns nothing, so nothing is printed)."""
    main()


if __name__ == "__main__":
    console_main()
