"""Files a user keeps, written whole or not at all.

Every file is written to a temporary file beside its final path (same directory, so the same
filesystem), flushed to disk, then renamed over the old one with ``os.replace``: a kill mid-write
leaves the previous file as it was (and a hidden ``.<name>.*.tmp`` that the next write removes),
and a full disk ends in one sentence (:class:`WriteFailed`) with the previous file intact.

    with atomic.replacing("out/predictions.npz") as tmp:   # write tmp however you like
        np.savez(tmp, images=images)
    atomic.write_text("out/summary.json", text)
    with atomic.replacing_files("out/lora") as tmp_dir:    # several files, each replaced on its own
        save_adapter(network, tmp_dir)
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


class WriteFailed(OSError):
    """A file could not be written (a full disk, no permission); the previous file is unchanged."""


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _failed(target: Path, err: OSError) -> WriteFailed:
    reason = err.strerror or str(err)
    fix = ("free space on that filesystem or write elsewhere (e.g. --trainer.default_root_dir DIR), then run again"
           if err.errno in (errno.ENOSPC, errno.EDQUOT) else "check the folder's permissions and space, then run again")
    return WriteFailed(err.errno, f"could not write {target} ({reason}); the previous file, if any, is unchanged: {fix}.")


def _write_failure(target: Path, err: BaseException, free: int | None) -> WriteFailed | None:
    """``err`` as :class:`WriteFailed` when it is a failed write: an ``OSError``, or a library's
    own error for one (safetensors says "os error 28"; torch's zip writer to a path only raises a
    RuntimeError "iostream error", so one on a filesystem left with no space (``free`` bytes,
    measured before cleaning up) counts too)."""
    if isinstance(err, WriteFailed):
        return err
    if isinstance(err, OSError):
        return _failed(target, err)
    text = str(err)
    nearly_full = isinstance(err, RuntimeError) and free is not None and free < _NEARLY_FULL
    if "No space left on device" in text or "os error 28" in text or nearly_full:
        return _failed(target, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    return None


#: free bytes below which a failed write is taken for a full disk
_NEARLY_FULL = 256 * 1024


def _free(path: Path) -> int | None:
    try:
        stat = os.statvfs(path)
    except (OSError, AttributeError):
        return None
    return stat.f_bavail * stat.f_frsize


def _remove_stale(target: Path) -> None:
    """Temporary files left beside ``target`` by a process killed mid-write."""
    for stale in target.parent.glob(f".{target.name}.*.tmp"):
        with contextlib.suppress(OSError):
            if stale.is_dir():
                shutil.rmtree(stale)
            else:
                stale.unlink()


@contextlib.contextmanager
def replacing(target: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``target`` to write; on success it is synced and renamed over
    ``target``. On any error the temporary file is removed and ``target`` is left as it was; an
    ``OSError`` (a full disk) becomes :class:`WriteFailed`, one sentence naming the file."""
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(target)
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
    except OSError as err:
        raise _failed(target, err) from None
    tmp = Path(name)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, target)
    except Exception as err:
        failure = _write_failure(target, err, _free(target.parent))
        with contextlib.suppress(OSError):
            tmp.unlink()
        if failure is None:
            raise
        raise failure from (None if failure is err else err)
    except BaseException:  # a Ctrl-C: nothing half-written stays behind
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_bytes(target: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``target`` atomically (see :func:`replacing`)."""
    with replacing(target) as tmp:
        tmp.write_bytes(data)
    return Path(target)


def write_text(target: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``target`` atomically (see :func:`replacing`)."""
    return write_bytes(target, text.encode("utf-8"))


@contextlib.contextmanager
def replacing_files(directory: str | os.PathLike) -> Iterator[Path]:
    """A temporary directory beside ``directory`` to write files into; on success each file
    written there is synced and renamed over its namesake in ``directory`` (created if needed),
    so every file of ``directory`` is at any moment either the previous one or the new one,
    whole. On an error nothing in ``directory`` changes."""
    directory = Path(directory)
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(directory)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    except OSError as err:
        raise _failed(directory, err) from None
    try:
        yield tmp
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        for path in files:
            _fsync(path)
        for path in files:
            final = directory / path.relative_to(tmp)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, final)
    except Exception as err:
        failure = _write_failure(directory, err, _free(tmp))
        if failure is None:
            raise
        raise failure from (None if failure is err else err)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
