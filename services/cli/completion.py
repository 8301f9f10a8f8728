"""Shell completion of ``oak`` for bash and zsh, through argcomplete: commands and flags come from the parser,
the names of services and applications from the root, asked as the user of the command line being typed.

Turn it on with ``eval "$(oak completion bash)"`` (or ``zsh``) in the shell's rc file.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Callable
from typing import Any

import argcomplete

ASK_TIMEOUT = 3.0  # seconds a Tab may wait for the root; then nothing is offered


def from_root(resource: str, key: str) -> Callable[..., list[str]]:
    """A completer offering the *key* of each item of ``<resource>/list``, asked of the root with the profile
    the command line names (``--data-dir``, ``--root``); nothing when the root does not answer in time."""

    def complete(prefix: str, parsed_args: argparse.Namespace, **_: Any) -> list[str]:
        try:
            names = asyncio.run(asyncio.wait_for(_ask(resource, key, parsed_args), ASK_TIMEOUT))
        except Exception as exc:  # noqa: BLE001 - a Tab never prints a traceback
            argcomplete.warn(f"oak: cannot ask the root for {resource} names ({exc})")
            return []
        return [name for name in names if name.startswith(prefix)]

    return complete


async def _ask(resource: str, key: str, args: argparse.Namespace) -> list[str]:
    from services.cli.client import OakClient, Profile, oak_home

    profile = Profile.load(oak_home(getattr(args, "data_dir", None)), getattr(args, "root", None))
    async with OakClient(profile) as oak:
        rows = await oak.request(resource, "list")
    return sorted({str(row[key]) for row in rows if isinstance(row, dict) and row.get(key)})


SERVICES = from_root("services", "job_name")
APPS = from_root("apps", "name")


def activate(parser: argparse.ArgumentParser) -> None:
    """Answer the shell's completion request, if this run is one (argcomplete exits then); else do nothing."""
    argcomplete.autocomplete(parser)


def script(shell: str) -> str:
    """The shell code that hooks ``oak`` to its completion in *shell* (``bash`` or ``zsh``)."""
    return argcomplete.shellcode(["oak"], shell=shell)
