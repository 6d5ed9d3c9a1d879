"""The ``sdo`` command's messages: one sentence from a parser's nested error, a config file's
problems the parser would not name, and which errors are bad input (:func:`clean_message`) rather
than a bug. Used by :mod:`sdo_lightning.cli`."""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path
from typing import Any

from lightning.fabric.utilities.exceptions import MisconfigurationException

from sdo_lightning import registry
from sdo_lightning.atomic import WriteFailed


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
