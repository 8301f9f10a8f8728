"""Files only their owner may read: every tier keeps its state, keys, tokens and logs this way.

A data directory is made 0700 (which already hides everything in it), and the files that hold secrets
or users' data are created 0600 as well, so a copy or a looser parent directory does not expose them.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

DIR_MODE, FILE_MODE = 0o700, 0o600


def private_dir(path: Path) -> Path:
    """Create *path* and its missing parents readable by their owner only, make *path* so; return it."""
    missing = [p for p in (path, *path.parents) if not p.exists()]
    for directory in reversed(missing):
        directory.mkdir(mode=DIR_MODE, exist_ok=True)
    if path.stat().st_uid == os.geteuid():
        os.chmod(path, DIR_MODE)
    return path


def private_opener(path: str, flags: int) -> int:
    """An ``opener=`` for :func:`open` that creates files 0600."""
    return os.open(path, flags, FILE_MODE)


def write_private(path: Path, text: str) -> None:
    """Replace *path* atomically with *text*: mode 0600 for a new file; an existing file's mode and
    group are kept (an operator may have made them readable by the broker's own account)."""
    try:
        old = os.stat(path)
    except FileNotFoundError:
        old = None
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    if old is not None:
        os.chmod(tmp, old.st_mode & 0o777)
        with contextlib.suppress(PermissionError):
            os.chown(tmp, -1, old.st_gid)
    os.replace(tmp, path)


def write_secret(path: Path, data: Any) -> None:
    """Write *data* as JSON that only the owner may read, in a private directory."""
    private_dir(path.parent)
    write_private(path, json.dumps(data))
    os.chmod(path, FILE_MODE)


def write_mode(path: Path, data: bytes | str, mode: int) -> None:
    """Write *data* to *path*, a file made with *mode* (a secret's file: nobody else reads it, even briefly)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data.encode() if isinstance(data, str) else data)
