"""The file behind a runtime's ``code``: a local path, a ``file://`` URL, or an ``http(s)://`` URL downloaded
once into the worker's cache (VM kernels, WebAssembly modules)."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path

FETCH_TIMEOUT = 120


def digest(*parts: str) -> str:
    """A short stable name for *parts* (a cache entry's)."""
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:20]


def fetch(entry: str, cache: Path) -> Path:
    """The local file behind *entry*: a path, a ``file://`` URL, or an ``http(s)://`` URL downloaded once."""
    url = urllib.parse.urlparse(entry)
    if url.scheme in ("", "file"):
        path = Path(urllib.parse.unquote(url.path) if url.scheme else entry)
        if not path.is_file():
            raise RuntimeError(f"code {entry!r}: no such file")
        return path
    if url.scheme not in ("http", "https"):
        raise RuntimeError(f"code {entry!r}: use a path, or a file, http or https URL")
    target = cache / "downloads" / digest(entry)
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as part:
            try:
                with urllib.request.urlopen(entry, timeout=FETCH_TIMEOUT) as answer:  # noqa: S310 - checked above
                    shutil.copyfileobj(answer, part)
            except OSError as exc:
                os.unlink(part.name)
                raise RuntimeError(f"cannot download {entry}: {exc}") from None
        os.replace(part.name, target)
    return target
