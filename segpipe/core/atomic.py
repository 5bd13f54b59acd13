"""Atomic file writes used by every stage.

Every file segpipe writes goes to a temporary name in the same folder and is renamed over the
target, so a process killed at any moment leaves either the old file or the new one, never a
truncated one. A killed process cannot remove its temporary file (``.NAME.@HOST.PID.XXXXXXXX.tmp...``);
each stage sweeps its output folders with :func:`remove_stale_temporaries` when it starts, which
removes the temporary files of processes of this host that no longer run. The host name is in the
temporary's name because a folder may be shared by several machines (a cluster's file system): a
process id says nothing about another machine's processes, so their files are left alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

_UMASK = os.umask(0o022)  # read once (os.umask can only be read by setting it), then restored
os.umask(_UMASK)


HOST_ENV = "SEGPIPE_HOST"  # overrides the host name, e.g. for containers that all share one


def host_name() -> str:
    """This machine's name as it appears in temporary file names (letters, digits and ``-`` only)."""
    name = os.environ.get(HOST_ENV) or socket.gethostname() or "localhost"
    return re.sub(r"[^A-Za-z0-9-]", "-", name)[:63]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``.

    ``suffix`` is kept on the temporary name for writers that insist on a file ending
    (nibabel picks the format from it, numpy appends ``.npy`` otherwise).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{target.name}.@{host_name()}.{os.getpid()}."
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp" + suffix, dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the permissions open() would
        os.replace(tmp_path, target)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        if isinstance(exc, OSError) and exc.filename is None:  # e.g. a full disk: name the file
            raise OSError(exc.errno, exc.strerror or str(exc), str(target)) from exc
        raise


# ``.NAME.@HOST.PID.XXXXXXXX.tmp``; names without ``@HOST`` were written by older versions on this host
_TEMPORARY = re.compile(r"^\..+?(?:\.@(?P<host>[A-Za-z0-9-]+))?\.(?P<pid>\d+)\.[a-z0-9_]{8}\.tmp")


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that killed processes of this host left in ``folder``; return them.

    Only files named by :func:`atomic_path` on this host whose writing process is gone are removed,
    so a concurrent writer on this machine or any other keeps its file. Under torchrun call it after
    all ranks have started (a barrier), as the stages do.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    here = host_name()
    removed = []
    for path in folder.iterdir():
        m = _TEMPORARY.match(path.name)
        if not m or (m["host"] or here) != here:
            continue
        if path.is_file() and not _process_alive(int(m["pid"])):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            removed.append(path)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any], suffix: str = "") -> None:
    """Call ``write(tmp_path)`` and atomically move the result to ``path``."""
    with atomic_path(path, suffix) as tmp:
        write(tmp)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically. NaN is written as ``null``."""
    text = json.dumps(_nan_to_none(obj), indent=2, sort_keys=False)
    atomic_write(path, lambda tmp: tmp.write_text(text + "\n"))


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file; errors name the file."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc


def save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    """Save an uncompressed (memory-mappable) ``.npy`` array atomically."""

    def _write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.save(fh, np.ascontiguousarray(array))

    atomic_write(path, _write)


def save_npz(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    """Save several arrays compressed into one ``.npz`` atomically."""

    def _write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays)

    atomic_write(path, _write)


def _nan_to_none(obj: Any) -> Any:
    if isinstance(obj, float) and obj != obj:  # NaN is not valid JSON
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_nan_to_none(v) for v in obj]
    if isinstance(obj, np.generic):
        return _nan_to_none(obj.item())
    return obj
