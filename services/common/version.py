"""Oakling's version, read from the installed package's metadata: pyproject.toml is the one place it is
written (clusters and workers report it, ``oak --version`` prints it)."""

from __future__ import annotations

from importlib import metadata


def _installed() -> str:
    try:
        return metadata.version("oakling")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "0+unknown"


VERSION = _installed()
