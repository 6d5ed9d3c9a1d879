"""The ``sdo`` command: a LightningCLI, plus ``sdo plugins``.

    sdo fit --config configs/quickstart.yaml      # optimize (LightningCLI's fit)
    sdo fit --config ... --ckpt_path last         # resume from the newest checkpoint of the runs
    sdo validate --config ... --ckpt_path last    # evaluation metrics on the data module's eval rows
    sdo predict --config ... --ckpt_path last     # images of the eval rows: predict_grid.png, predictions.npz
    sdo fit --help / --print_config               # every option, from the docstrings
    sdo plugins                                   # registered objectives, solvers, gradient modes
    sdo mix --adapters DIR [DIR ...] --scales 0 0.5 1   # sample with LoRA adapters at several scales
    sdo serve-reward --objective NAME [--address ...]   # an objective in its own process (RemoteObjective)

Mistakes in a config or on the command line end in one line saying what was wrong and what is
accepted (``SDO_VERBOSE_ERRORS=1`` shows the parser's full message, or the traceback).
"""

from __future__ import annotations

import importlib
import os
import sys
import typing
import warnings
from pathlib import Path
from typing import Any, NoReturn

from jsonargparse import lazy_instance
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar, TQDMProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info

from sdo_lightning import registry
from sdo_lightning.training.callbacks import InterruptCheckpoint
from sdo_lightning.training.checkpoint_io import read_checkpoint
from sdo_lightning.cli_messages import SEED_MAX, clean_message, config_file_problem, short_error

VERBOSE_ENV = "SDO_VERBOSE_ERRORS"
#: Lightning's notes that are expected in every sdo fit, silenced while the command runs: the
#: frozen backbone and objective networks are in eval mode on purpose, and the data loaders have
#: no workers, so their iterable datasets' lengths are exact; a fit without an evaluation set
#: has an empty list of validation loaders.
EXPECTED_NOTES = (r".*module\(s\) in eval mode.*", r".*`IterableDataset` has `__len__` defined.*",
                  r".*Total length of `list` across ranks is zero.*")

TRAINER_DEFAULTS: dict[str, Any] = {
    "max_steps": 50,
    "log_every_n_steps": 1,
    "num_sanity_val_steps": 0,
    "enable_model_summary": False,
    # no placeholder hp_metric: the modules log their hyperparameters with the final metrics
    "logger": lazy_instance(TensorBoardLogger, save_dir="runs", default_hp_metric=False),
}
#: optimizer steps between the default checkpoints (a killed run loses at most this many)
CHECKPOINT_EVERY_N_STEPS = 25
#: where ``sdo fit --trainer.logger false`` runs go, in ``version_N`` folders under the root directory
RUNS_WITHOUT_LOGGER = "sdo_runs"


def _next_version(root: Path) -> Path:
    """``root/version_N`` for the first N not taken yet."""
    taken = {p.name for p in root.glob("version_*")} if root.is_dir() else set()
    n = 0
    while f"version_{n}" in taken:
        n += 1
    return root / f"version_{n}"


def default_callbacks(configured: list[Any], trainer_config: dict[str, Any]) -> list[Any]:
    """Fresh callbacks every ``sdo fit`` adds, unless the config has its own of the same kind or
    turns that kind off: a tqdm bar (it counts optimizer steps plainly), a ModelCheckpoint every
    25 steps with ``last.ckpt`` (resume with ``--ckpt_path last``) and :class:`InterruptCheckpoint`
    (Ctrl-C writes ``interrupted.ckpt``)."""
    has = lambda kind: any(isinstance(c, kind) for c in configured)  # noqa: E731
    out: list[Any] = []
    if trainer_config.get("enable_progress_bar") is not False and not has(ProgressBar):
        out.append(TQDMProgressBar())
    if trainer_config.get("enable_checkpointing") is not False and not has(ModelCheckpoint):
        out.append(ModelCheckpoint(every_n_train_steps=CHECKPOINT_EVERY_N_STEPS, save_last=True))
    if not has(InterruptCheckpoint):
        out.append(InterruptCheckpoint())
    return out

def _validation_interval_within(trainer_config: dict[str, Any]) -> int | None:
    """A validation interval that fits a run shortened with ``--trainer.max_steps``, or None.

    The data modules' training loaders hold ``max_steps x accumulate_grad_batches`` batches, and
    Lightning refuses an integer ``val_check_interval`` larger than that. A demo validating every
    50 steps, run for 5, validates once at its end instead (said in one line)."""
    interval = trainer_config.get("val_check_interval")
    max_steps = trainer_config.get("max_steps")
    accumulate = trainer_config.get("accumulate_grad_batches") or 1
    if isinstance(interval, bool) or not isinstance(interval, int) or not isinstance(max_steps, int) or max_steps < 1:
        return None
    batches = max_steps * int(accumulate)
    if interval <= batches:
        return None
    rank_zero_info(f"val_check_interval {interval} is longer than the run ({max_steps} optimizer steps): "
                   f"validating once, at the end.")
    return batches


class SDOArgumentParser(LightningArgumentParser):
    """LightningCLI's parser with one-line error messages."""

    def parse_path(self, path: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
        problem = config_file_problem(str(path))
        if problem is not None:
            self.error(problem)
        return super().parse_path(path, *args, **kwargs)

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        # nested parsers (exit_on_error False) raise for the outer one to collect: leave theirs whole
        if self.exit_on_error and os.environ.get(VERBOSE_ENV, "").lower() not in ("1", "true", "yes"):
            message = short_error(message)
        super().error(message, ex)


def _admits_none(hint: Any) -> bool:
    if hint is Any or hint is None or hint is type(None):
        return True
    return any(_admits_none(arg) for arg in typing.get_args(hint)) if typing.get_origin(hint) is not None else False


def null_arguments(node: Any, key: str) -> list[str]:
    """Dotted keys of the ``init_args`` set to null whose parameter type does not admit None
    (jsonargparse lets ``null`` through for e.g. an ``int``; the class would then fail deep inside)."""
    out: list[str] = []
    if isinstance(node, list):
        for i, item in enumerate(node):
            out += null_arguments(item, f"{key}[{i}]")
        return out
    if not hasattr(node, "get") or not isinstance(node.get("class_path"), str):
        return out
    init_args = node.get("init_args")
    try:
        module, _, name = node["class_path"].rpartition(".")
        cls = getattr(importlib.import_module(module), name)
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # noqa: BLE001 - the parser reports unknown classes itself
        return out
    for arg, value in (vars(init_args).items() if init_args is not None and hasattr(init_args, "__dict__") else []):
        if value is None and arg in hints and not _admits_none(hints[arg]):
            out.append(f"{key}.{arg}")
        elif value is not None:
            out += null_arguments(value, f"{key}.{arg}")
    return out


def _flat(node: Any, prefix: str) -> dict[str, Any]:
    """A parsed config section as ``{dotted key: value}`` (plain values as they are, others as
    their repr, so a checkpoint can hold them)."""
    if hasattr(node, "as_dict"):
        node = node.as_dict()
    if isinstance(node, dict):
        out: dict[str, str] = {}
        for key, value in node.items():
            out.update(_flat(value, f"{prefix}.{key}"))
        return out
    if isinstance(node, list):
        out = {}
        for i, value in enumerate(node):
            out.update(_flat(value, f"{prefix}[{i}]"))
        return out
    return {prefix: node if node is None or isinstance(node, (bool, int, float, str)) else repr(node)}


class SDOCLI(LightningCLI):
    """LightningCLI with the project's modules and plugins importable by class name, one-line
    errors, checkpoints every 25 steps and on Ctrl-C, and ``--ckpt_path last`` that finds the
    newest checkpoint of earlier runs (or says there is none) instead of silently starting over."""

    def _parse_ckpt_path(self) -> None:
        """Check an explicit ``--ckpt_path FILE`` with the project's reader, before anything is built.

        LightningCLI's own version unpickles the file itself (a random-byte or empty file ends in a
        traceback) and merges its ``hyper_parameters`` into the config, so a crafted checkpoint could
        choose which classes are imported and built. Here a checkpoint never chooses classes or
        settings: the config does; the file is only read (``weights_only``) to refuse a bad one in
        one sentence now rather than after the model is built."""
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        ckpt_path = self.config[subcommand].get("ckpt_path")
        if ckpt_path and ckpt_path not in ("last", "best", "hpc", "registry") and not str(ckpt_path).startswith("registry:"):
            self._checkpoint_run = read_checkpoint(ckpt_path).get("sdo_run")

    def _set_seed(self) -> None:
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        seed = config.get("seed_everything")
        if not isinstance(seed, bool) and isinstance(seed, int) and not 0 <= seed <= SEED_MAX:
            self.parser.error(f"seed_everything {seed} is out of range: give a seed from 0 to {SEED_MAX} (or true for "
                              "a random one).")
        super()._set_seed()

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        nulls = [k for part in ("model", "data") for k in null_arguments(config.get(part), part)]
        trainer = config.get("trainer")
        if trainer is not None:
            fake = {"class_path": f"{self.trainer_class.__module__}.{self.trainer_class.__name__}", "init_args": trainer}
            nulls += null_arguments(fake, "trainer")
        if nulls:
            self.parser.error(f"{nulls[0]}: null is not a value this argument takes; give a value or leave it out "
                              "for the default.")

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        # fresh default callbacks for every trainer (a reused ModelCheckpoint keeps its first
        # run's directory), added to those of the config unless it has its own of the same kind
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        trainer_config = {**(config.get("trainer") or {}), **kwargs}
        configured = trainer_config.get("callbacks") or []
        configured = list(configured) if isinstance(configured, list) else [configured]
        if trainer_config.get("logger") in (False, None):
            # without a logger Lightning writes into the root directory itself (config.yaml, results,
            # checkpoints): give each run a fresh folder there instead, never the working directory's files
            root = Path(trainer_config.get("default_root_dir") or os.getcwd())
            kwargs["default_root_dir"] = str(_next_version(root / RUNS_WITHOUT_LOGGER))
        shorter = _validation_interval_within(trainer_config)
        if shorter is not None:
            kwargs["val_check_interval"] = shorter
        return super().instantiate_trainer(**kwargs, callbacks=configured + default_callbacks(configured, trainer_config))

    def before_fit(self) -> None:
        self._prepare(evaluation=False)

    # validate, test and predict read a checkpoint of a fit (``--ckpt_path last`` finds the newest
    # one of a model with these settings) or start from the model as configured (e.g. an adapter)
    def before_validate(self) -> None:
        self._prepare(evaluation=True)

    def before_test(self) -> None:
        self._prepare(evaluation=True)

    def before_predict(self) -> None:
        self._prepare(evaluation=True)

    def _prepare(self, evaluation: bool) -> None:
        if hasattr(self.model, "run_config"):  # checkpoints record, and resuming checks, every setting
            raw = self.config[self.subcommand]
            self.model.run_config = {**_flat(raw.get("model"), "model"), **_flat(raw.get("data"), "data")}
        config = self.config_init[self.subcommand]
        if config.get("ckpt_path") != "last":
            if config.get("ckpt_path"):
                self._check_adapter_and_checkpoint(config["ckpt_path"], getattr(self, "_checkpoint_run", None), evaluation)
            return
        roots = self._checkpoint_roots()
        found = sorted({p for root in roots if root.is_dir() for p in root.rglob("*.ckpt") if p.is_file()},
                       key=lambda p: (p.stat().st_mtime_ns, p.name == "last.ckpt"), reverse=True)
        skipped: list[str] = []
        for path in found:  # the newest readable checkpoint of this run
            try:
                saved = read_checkpoint(path).get("sdo_run")
            except ValueError as err:
                skipped.append(str(err).split(";")[0])
                continue
            diff = (self.model.fingerprint_difference(saved, evaluation=evaluation)
                    if hasattr(self.model, "fingerprint_difference") else None)
            if diff is None:
                verb = "Reading" if evaluation else "Resuming from"
                rank_zero_info(f"{verb} {path}" + (f" (skipped {len(skipped)} newer: {skipped[0]})" if skipped else ""))
                config["ckpt_path"] = str(path)
                self._check_adapter_and_checkpoint(path, saved, evaluation)
                return
            skipped.append(f"{path} is from another run ({diff})")
        where = ", ".join(map(str, roots))
        if not found:
            raise FileNotFoundError(f"--ckpt_path last: no checkpoint (*.ckpt) under {where}; give --ckpt_path PATH, "
                                    "or drop it to start a new run.")
        raise FileNotFoundError(f"--ckpt_path last: none of the {len(found)} checkpoints under {where} is of this run "
                                f"and readable (newest: {skipped[0]}); give --ckpt_path PATH, or drop it to start a new run.")

    def _check_adapter_and_checkpoint(self, path: Any, saved: dict[str, Any] | None, evaluation: bool) -> None:
        """``--model.adapter A`` with ``--ckpt_path B``: the checkpoint's adapter weights are loaded
        after A's and replace them. Said in one line when B's run started from A (resuming it, or
        evaluating where it got to); refused for an evaluation otherwise, since A would be ignored."""
        adapter = getattr(self.model, "adapter", None)
        if adapter is None:
            return
        started_from = ((saved or {}).get("config") or {}).get("model.init_args.adapter")
        if started_from is not None and str(Path(started_from)) == str(Path(adapter)):
            rank_zero_info(f"--ckpt_path {path} continues a fit that started from --model.adapter {adapter}: "
                           "using the checkpoint's adapter weights.")
            return
        if evaluation:
            raise ValueError(f"--model.adapter {adapter} and --ckpt_path {path} both give the adapter weights, and the "
                             "checkpoint's would replace the adapter's: drop --ckpt_path to use the adapter, or give "
                             "--model.adapter null to use the checkpoint.")
        rank_zero_info(f"--ckpt_path {path}: resuming with the checkpoint's adapter weights, which replace those of "
                       f"--model.adapter {adapter}.")

    def _checkpoint_roots(self) -> list[Path]:
        """Where ``last`` looks: the checkpoint callbacks' folders and the logger's run folders;
        without a logger, the run folders ``sdo fit`` made under the root directory (never the
        whole working directory)."""
        roots = [Path(cb.dirpath) for cb in self.trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)]
        logger = self.trainer.logger
        root = getattr(logger, "root_dir", None) or getattr(logger, "save_dir", None)
        # no logger: the run folders under the root directory (this run's is one of them)
        roots.append(Path(root) if root else Path(self.trainer.default_root_dir).parent)
        return roots


def _plain_help(argv: list[str]) -> bool:
    """``sdo --help`` or ``sdo SUBCOMMAND --help``: help that lists no objective, solver,
    gradient mode or backbone, so third-party plugins need not be imported for it."""
    return (len(argv) == 1 and argv[0] in ("-h", "--help")) or (
        len(argv) == 2 and argv[0] in ("fit", "validate", "test", "predict") and argv[1] in ("-h", "--help"))


def main(args: list[str] | None = None, run: bool = True) -> SDOCLI | None:
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] == ["plugins"]:
        registry.load_plugins()
        print(registry.format_table(registry.registered()))
        return None
    if argv[:1] == ["serve-reward"]:
        from sdo_lightning.reward_server import serve

        serve(argv[1:])
        return None
    if argv[:1] == ["mix"]:
        from sdo_lightning.mix import mix

        mix(argv[1:])
        return None
    if _plain_help(argv):  # the subcommands' and the modules' options: no plugin shows there
        registry._import_builtins()
    else:
        registry.load_plugins()
    for kind in registry.OTHER_KINDS:  # importing registers modules, data modules, targets by class name
        registry.classes(kind)
    with warnings.catch_warnings():
        for note in EXPECTED_NOTES:
            warnings.filterwarnings("ignore", message=note)
        return SDOCLI(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=None if args is None else argv,
            run=run,
            trainer_defaults=TRAINER_DEFAULTS,
            # no overwrite: runs log into new version folders; with --trainer.logger false the
            # folder is the working directory, where a config.yaml may be the user's own
            auto_configure_optimizers=False,
            parser_class=SDOArgumentParser,
        )


def console_main() -> None:
    """Entry point of the ``sdo`` console script (returns nothing, so nothing is printed).

    Bad input (a missing model, a wrong value, a non-finite loss with ``on_nonfinite: stop``)
    ends with ``error: <one sentence>`` and exit status 1; set ``SDO_VERBOSE_ERRORS=1`` for the
    traceback. Anything else is a bug and shows its traceback.
    """
    try:
        main()
    except Exception as err:
        message = clean_message(err)
        if message is None or os.environ.get(VERBOSE_ENV, "").lower() in ("1", "true", "yes"):
            raise
        sys.stderr.write(f"error: {message}\n(set {VERBOSE_ENV}=1 for the traceback)\n")
        sys.exit(1)


if __name__ == "__main__":
    console_main()
