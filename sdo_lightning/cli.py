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

import errno
import importlib
import os
import re
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
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities import rank_zero_info

from sdo_lightning import registry
from sdo_lightning.atomic import WriteFailed
from sdo_lightning.training.callbacks import InterruptCheckpoint
from sdo_lightning.training.checkpoint_io import read_checkpoint

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


#: parameter name -> (what it is, the registry kind of the classes it takes)
_KINDS: dict[str, tuple[str, str]] = {
    "objective": ("objective", "objectives"),
    "held_out_objective": ("objective", "objectives"),
    "objectives": ("objective", "objectives"),
    "solver": ("solver", "solvers"),
    "gradient_mode": ("gradient mode", "gradient_modes"),
    "backbone": ("backbone", "backbones"),
    "target": ("optimization target", "targets"),
}
#: parameters that take a class of another library, and an example of one (for a value that is none)
_LIBRARY_CLASSES: dict[str, tuple[str, str]] = {
    "callbacks": ("a Lightning Callback class", "{class_path: lightning.pytorch.callbacks.EarlyStopping, "
                  "init_args: {monitor: train/loss}}"),
    "optimizer": ("an optimizer class", "{class_path: torch.optim.AdamW, init_args: {lr: 0.001}}"),
}
#: the top-level keys, matched whole (``model`` is also an argument of every backbone)
_TOP_KINDS: dict[str, tuple[str, str]] = {"model": ("module", "modules"), "data": ("data module", "data")}
# lines of jsonargparse's nested messages that only say where the problem is, not what it is
_WRAPPERS = re.compile(
    r"^(- )?(Parser key|Does not validate against|Subtypes:|Errors:|Problem with given class_path|"
    r"Expected a <class 'NoneType'>|Given value type:|Given value:|Subclass types expect one of:|a class path \(str\)|"
    r"a dict with|a dict without)"
)


#: (class, option) -> where an option of an earlier release lives now, as YAML
MOVED_OPTIONS: dict[tuple[str, str], str] = {
    ("LatentOptimization", "project_to_shell"):
        "target: {class_path: StartNoise (or IntermediateLatent), init_args: {project_to_shell: ...}}",
    ("LatentOptimization", "linf_radius"):
        "target: {class_path: StartNoise (or IntermediateLatent), init_args: {linf_radius: ...}}",
    ("LatentOptimization", "invert_images"):
        "target: {class_path: IntermediateLatent, init_args: {invert_images: ...}}",
}


def _known(key: str) -> tuple[str, list[str]] | None:
    last = re.sub(r"\[\d+\]$", "", key.rsplit(".", 1)[-1])
    found = _TOP_KINDS.get(key) or _KINDS.get(last)
    if found is None:
        return None
    what, kind = found
    if kind == "gradient_modes":  # the key takes a search too (LatentOptimization)
        return "gradient mode or search", registry.names(kind) + registry.names("searches")
    return what, registry.names(kind)


def short_error(message: str) -> str:
    """One line from jsonargparse's nested parser message: where, what, and what is accepted."""
    keys = re.findall(r'Parser key "([^"]+)"', message)
    key = ".".join(keys)
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    leaves = [line.lstrip("- ").strip() for line in lines if not _WRAPPERS.match(line)]
    leaf = leaves[0] if leaves else (lines[0] if lines else message)
    known = _known(key) if key else None
    unknown = re.search(r"Expected a path but (\S+) either not accessible|Expected a dot import path string: (\S+)|"
                        r"Problem with given class_path '([^']+)':\s*\n\s*(?:- )?(?:Import|No module)", message)
    if unknown and known is not None:
        name = next(g for g in unknown.groups() if g)
        what, names = known
        return (f"{key}: {name!r} is not a known {what}; known: {', '.join(names)} "
                "(or give a full class path, e.g. my_package.MyClass).")
    library = _LIBRARY_CLASSES.get(re.sub(r"\[\d+\]$", "", key.rsplit(".", 1)[-1])) if key else None
    if unknown and library is not None:
        name = next(g for g in unknown.groups() if g)
        return f"{key}: {name!r} is not {library[0]}; give its full class path, e.g. {library[1]}."
    if key.rsplit(".", 1)[-1] == "seed_everything":
        return f"{key}: expected an integer seed from 0 to {SEED_MAX} (or true for a random one, false for none)."
    choices = f"a class name ({', '.join(known[1])})" if known else "a class name"
    not_subclass = re.search(r"Not a valid subclass of (\w+)(?:\. Got value: (.*))?", leaf)
    if not_subclass:
        got = f", got {not_subclass.group(2)}" if not_subclass.group(2) else ""
        return (f"{key or 'value'}: expected {choices} or {{class_path: NAME, init_args: {{...}}}} for a "
                f"{not_subclass.group(1)}{got}.")
    if leaf.startswith("unhashable type"):
        return f"{key or 'value'}: class_path must be {choices}, a string, with the arguments under init_args."
    if re.match(r"'\w+' object has no attribute 'keys'", leaf):
        classes = re.findall(r"Problem with given class_path '([^']+)'", message)
        owner = classes[-1].rsplit(".", 1)[-1] if classes else "the class"
        return f"{key or 'value'}: init_args of {owner} must be a mapping of argument names to values."
    accepted = re.search(r"Option '([^']+)' is not accepted", leaf)
    if accepted:
        option = accepted.group(1)
        classes = re.findall(r"Problem with given class_path '([^']+)'", message)
        owner = classes[-1].rsplit(".", 1)[-1] if classes else None
        if (owner, option) in MOVED_OPTIONS:
            return (f"{key + ': ' if key else ''}{owner}'s option {option!r} moved to the optimization target: write "
                    f"{MOVED_OPTIONS[owner, option]} instead.")
        return f"{key + ': ' if key else ''}option {option!r} is not accepted; see `sdo fit --help` for the options."
    return f"{key + ': ' if key else ''}{leaf}"


#: the largest seed Lightning's seed_everything takes (numpy's generators take 32 bits)
SEED_MAX = 2**32 - 1


def config_file_problem(path: str | os.PathLike) -> str | None:
    """What is wrong with the YAML config file at ``path`` that the parser would report without
    naming the file, or silently: not UTF-8, empty, a key given twice in one mapping (YAML lets
    the last one win), not a mapping. None when nothing is (or it is not a local file)."""
    import yaml

    file = Path(path)
    if not file.is_file():
        return None
    raw = file.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return (f"config {path} is not UTF-8 text (byte 0x{raw[err.start]:02x} at position {err.start}); save it "
                "as UTF-8.")
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return None  # the parser says where the syntax is wrong
    if node is None:
        return f"config {path} is empty; give a YAML mapping of options (model:, data:, trainer:), or drop --config."
    if not isinstance(node, yaml.MappingNode):
        return f"config {path} is not a mapping of options; write it as model: ..., data: ..., trainer: ...."
    twice = _duplicate_key(node)
    if twice is not None:
        key, first, second = twice
        return (f"config {path}: {key!r} is given twice in the same mapping (lines {first} and {second}), and only "
                "one can count; keep one of them.")
    return None


def _duplicate_key(node: Any) -> tuple[str, int, int] | None:
    """The first key given twice in one mapping of a composed YAML node: (dotted key, lines)."""
    import yaml

    todo: list[tuple[Any, str]] = [(node, "")]
    while todo:
        current, prefix = todo.pop(0)
        if isinstance(current, yaml.MappingNode):
            seen: dict[str, int] = {}
            for key_node, value in current.value:
                key = str(key_node.value)
                line = key_node.start_mark.line + 1
                if key in seen and key != "<<":
                    return f"{prefix}{key}", seen[key], line
                seen[key] = line
                todo.append((value, f"{prefix}{key}."))
        elif isinstance(current, yaml.SequenceNode):
            todo += [(item, f"{prefix.rstrip('.')}[{i}].") for i, item in enumerate(current.value)]
    return None


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


#: errors that mean bad input (the project's own are one sentence each); Lightning's
#: MisconfigurationException covers trainer options (max_steps -5, devices 0, a missing GPU)
CLEAN_ERRORS: tuple[type[BaseException], ...] = (
    ValueError, FileNotFoundError, KeyError, FloatingPointError, ImportError, PermissionError, NotADirectoryError,
    IsADirectoryError, FileExistsError, MisconfigurationException, ConnectionError, WriteFailed,
)


def _chain(err: BaseException) -> list[BaseException]:
    """The exceptions Python prints for ``err``, outermost first (an explicit cause, else the
    context unless ``from None`` hid it)."""
    out = [err]
    while True:
        inner = err.__cause__ if err.__cause__ is not None else (None if err.__suppress_context__ else err.__context__)
        if inner is None or inner in out:
            return out
        out.append(inner)
        err = inner


def _raised_here(err: BaseException) -> bool:
    """True when ``err`` was raised by this project's code (its sentences say what to fix)."""
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and str(tb.tb_frame.f_globals.get("__name__", "")).startswith("sdo_lightning")


def clean_message(err: BaseException) -> str | None:
    """``"<Type>: <message>"`` for bad input, None for anything else (a bug, with a traceback).

    The message is the outermost bad-input error the project raised itself (it names what to fix,
    and may wrap a library's error ``from`` it); jsonargparse's wrappers around it are skipped.
    Without one, it is the innermost error of the chain, if that is a bad-input error.
    """
    chain = _chain(err)
    full = next((e for e in chain if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)), None)
    if full is not None and not any(isinstance(e, WriteFailed) for e in chain):  # a library's own write
        where = f" {full.filename}" if full.filename else " a file of the run"
        return (f"WriteFailed: could not write{where} ({full.strerror}); free space on that filesystem or write "
                "elsewhere (e.g. --trainer.default_root_dir DIR), then run again.")
    ours = [e for e in chain if isinstance(e, CLEAN_ERRORS) and _raised_here(e)]
    err = ours[0] if ours else chain[-1]
    if not isinstance(err, CLEAN_ERRORS):
        return None
    message = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    if "\n" in message.strip():
        message = short_error(message)
    return f"{type(err).__name__}: {message.strip()}"


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
