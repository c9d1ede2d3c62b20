"""Atomic file writes: a file the user has is either the old one or the new one, never half of each.

Where temporary files go: a write to ``folder/name`` first writes ``folder/.name.<host>-<pid>.<random>.tmp``
(the same folder, so that the final rename never crosses file systems), then renames it over
``folder/name``. On any error the temporary file is removed. Only a process killed outright
(``kill -9``, a power cut) leaves one behind; the next write to the same path removes every such
file whose writer is gone (same host, process no longer running), those of other hosts once they
are a day old, and the ``folder/.name.<random>.tmp`` files of 0.1 once they are a minute old.
"""

from __future__ import annotations

import os
import re
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

__all__ = [
    "atomic_torch_save",
    "atomic_write",
    "atomic_write_text",
    "file_problem",
    "folder_problem",
    "stale_temporary_files",
]

_OTHER_HOST_STALE_S = 24 * 3600.0
_LEGACY_STALE_S = 60.0


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())[:32] or "host"


def _temp_pattern(name: str) -> re.Pattern[str]:
    """Temporary files of writes to ``name``: ``.name.<host>-<pid>.<random>.tmp`` (0.1: ``.name.<random>.tmp``)."""
    return re.compile(rf"^\.{re.escape(name)}\.(?:(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)\.)?[A-Za-z0-9_]+\.tmp$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's process, or not a pid at all
        return pid < 2**31
    return True


def stale_temporary_files(path: str | os.PathLike[str]) -> list[Path]:
    """The temporary files that crashed writes to ``path`` left beside it (see the module docstring)."""
    path = Path(path)
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return []
    pattern, host, now = _temp_pattern(path.name), _host(), time.time()
    stale = []
    for entry in entries:
        match = pattern.match(entry.name)
        if match is None or not entry.is_file(follow_symlinks=False):
            continue
        try:
            age = now - entry.stat(follow_symlinks=False).st_mtime
        except OSError:
            continue
        if match["pid"] is None:
            gone = age > _LEGACY_STALE_S
        elif match["host"] == host:
            gone = int(match["pid"]) != os.getpid() and not _alive(int(match["pid"]))
        else:
            gone = age > _OTHER_HOST_STALE_S
        if gone:
            stale.append(Path(entry.path))
    return stale


def folder_problem(folder: str | os.PathLike[str]) -> str | None:
    """Why files cannot be written into ``folder`` (created if missing), or ``None`` if they can.

    Checks, without creating anything: ``folder`` and every existing folder above it are folders
    (not files), and the nearest existing one can be written to.

    Example:
        >>> import tempfile, os
        >>> afile = os.path.join(tempfile.mkdtemp(), "afile")
        >>> open(afile, "w").close()
        >>> folder_problem(os.path.join(afile, "run")).endswith("is a file, not a folder")
        True
    """
    folder = Path(folder)
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            if not candidate.is_dir():
                return f"{os.fspath(candidate)!r} is a file, not a folder"
            if not os.access(candidate, os.W_OK | os.X_OK):
                return f"{os.fspath(candidate)!r} is not writable"
            return None
    return None


def file_problem(path: str | os.PathLike[str]) -> str | None:
    """Why ``path`` cannot be written as a file (its folder created if missing), or ``None`` if it can.

    Example:
        >>> import tempfile
        >>> file_problem(tempfile.mkdtemp()).endswith("is a folder")
        True
    """
    path = Path(path)
    if path.is_dir():
        return f"{os.fspath(path)!r} is a folder"
    return folder_problem(path.parent)


def _check_target(path: Path) -> None:
    if path.is_dir():
        raise IsADirectoryError(f"Cannot write {os.fspath(path)!r}: it is a folder. Give the path of a file in it.")
    problem = folder_problem(path.parent)
    if problem is not None:
        cls = NotADirectoryError if problem.endswith("not a folder") else PermissionError
        raise cls(f"Cannot write {os.fspath(path)!r}: {problem}.")


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], Any]) -> None:
    """Call ``write`` on a temporary file in the same folder, then rename it over ``path``.

    The file gets the permissions a plain ``open(path, "w")`` would give it (``0o666`` less the
    umask), not the private ``0o600`` of a temporary file. On any error the temporary file is
    removed and ``path`` is left as it was; temporary files that a killed earlier write to
    ``path`` left are removed first.

    Raises:
        IsADirectoryError: ``path`` is a folder.
        NotADirectoryError: a parent of ``path`` is a file.
        PermissionError: the folder cannot be written to.

    Example:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "hello.txt")
        >>> atomic_write(path, lambda f: f.write(b"hello"))
        >>> open(path).read()
        'hello'
    """
    path = Path(path)
    _check_target(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in stale_temporary_files(path):
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_host()}-{os.getpid()}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save(obj)`` to ``path``, atomically."""
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path``, atomically."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))
