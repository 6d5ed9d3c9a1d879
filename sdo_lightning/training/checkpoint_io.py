"""Checkpoints written atomically and read without running code.

Writing: the checkpoint goes to a temporary file beside its final path (same directory, so the
same filesystem), is flushed to disk, then renamed over the old one; a full disk or a kill
mid-write leaves the previous checkpoint whole. Reading: only local files, only with
``torch.load(weights_only=True)`` (tensors and plain values; nothing is unpickled that could run
code), whatever ``--weights_only`` says; anything else ends in one sentence.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Callable

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def read_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """The checkpoint at local ``path``, loaded with ``weights_only=True``.

    Raises:
        ValueError: ``path`` is a URL, not a file, or not a checkpoint this project can read.
    """
    text = str(path)
    if _URL.match(text):
        raise ValueError(f"checkpoint {text!r} is a URL; checkpoints are read from local files only: download it "
                         "and give its path.")
    file = Path(text).expanduser()
    if not file.is_file():
        what = "a directory" if file.is_dir() else "not there"
        raise ValueError(f"checkpoint {text!r} is {what}; give the path of a .ckpt file (or --ckpt_path last).")
    try:
        checkpoint = torch.load(file, map_location=map_location, weights_only=True)
    except Exception as err:  # truncated, empty, random bytes, a YAML file, a pickle of Python objects
        unsafe = "Weights only load failed" in str(err)
        reason = ("it holds Python objects besides tensors and plain values, which are not unpickled since "
                  "that could run code" if unsafe else
                  f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0].split('. ')[0][:120]}")
        raise ValueError(f"checkpoint {text!r} could not be read ({reason}); give a checkpoint written by sdo fit.") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"checkpoint {text!r} is not a Lightning checkpoint (no state_dict); give a checkpoint "
                         "written by sdo fit.")
    return checkpoint


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO with atomic writes beside the target and ``weights_only`` reads
    (see the module docstring). The LightningModules here install it in place of the default."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        from sdo_lightning import atomic

        with atomic.replacing(path) as tmp, open(tmp, "wb") as f:
            torch.save(checkpoint, f)  # through Python's file: a full disk raises OSError (ENOSPC)

    def load_checkpoint(self, path: str | os.PathLike, map_location: Callable | Any = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        return read_checkpoint(path, map_location if map_location is not None else "cpu")
