"""Shell completion of ``oak``: the shell's request answered by the real command (argcomplete's protocol), and
the scripts bash and zsh load."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import dumps, eventually, sla, sleeper
from tests.stack import REPO, Stack, oak
from tests.test_three_tiers import _online_nodes

pytestmark = pytest.mark.timeout(120)


def complete(line: str, tmp_path: Path, *env: tuple[str, str]) -> list[str]:
    """What ``oak`` offers for a Tab at the end of *line*, as bash would ask it."""
    out = tmp_path / f"completion-{len(line)}"
    environment = {**os.environ, "_ARGCOMPLETE": "1", "_ARGCOMPLETE_SHELL": "bash", "COMP_LINE": line,
                   "COMP_POINT": str(len(line)), "_ARGCOMPLETE_IFS": "\n", "_ARGCOMPLETE_STDOUT_FILENAME": str(out),
                   **dict(env)}
    done = subprocess.run(oak(), env=environment, capture_output=True, text=True, cwd=REPO, timeout=60)
    assert done.returncode == 0, done.stderr
    return sorted(word.strip() for word in out.read_text().split("\n") if word.strip())


def test_commands_and_flags(tmp_path: Path) -> None:
    """Sub-commands and flags come from the parser."""
    assert "deploy" in complete("oak service dep", tmp_path)
    assert {"doctor", "completion", "service", "worker"} <= set(complete("oak ", tmp_path))
    assert "--metrics-port" in complete("oak worker --metrics", tmp_path)


async def test_service_and_app_names_come_from_the_root(stack: Stack, api: Any, tmp_path: Path) -> None:
    """``oak service deploy <Tab>`` offers the user's services, ``oak app delete <Tab>`` the applications,
    asked of the root with the profile in --data-dir."""
    stack.root()
    stack.cluster("c1")
    stack.worker("w1", "c1")
    client = await api()
    await eventually(lambda: _online_nodes(client, 1), what="the worker online")
    await client.request("apps", "create", raw=dumps(sla(sleeper("web"), sleeper("db"), app="shop")))
    home = str(stack.base / "root")
    offered = await asyncio.to_thread(complete, f"oak service deploy --data-dir {home} shop.test.w", tmp_path)
    assert offered == ["shop.test.web.test"]
    offered = await asyncio.to_thread(complete, f"oak app delete --data-dir {home} ", tmp_path)
    assert [word for word in offered if not word.startswith("-")] == ["shop"], "with the flags, the apps"
    gone = await asyncio.to_thread(complete, "oak service deploy --data-dir /nonexistent ", tmp_path)
    assert [word for word in gone if not word.startswith("-")] == [], "no root: no names, and no traceback"


@pytest.mark.parametrize("shell", ["bash", "zsh"])
def test_the_shell_scripts_load(shell: str, tmp_path: Path) -> None:
    """``oak completion bash|zsh`` prints code its shell accepts (run where the shell is installed)."""
    done = subprocess.run(oak("completion", shell), capture_output=True, text=True, cwd=REPO, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "oak" in done.stdout
    if shutil.which(shell) is None:
        pytest.skip(f"{shell} is not installed here: the script was printed, not loaded")
    script = tmp_path / f"oak.{shell}"
    script.write_text(done.stdout)
    loader = "autoload -U compinit && compinit -u; " if shell == "zsh" else ""
    loaded = subprocess.run([shell, "-c", f"{loader}source {script} && echo loaded"], capture_output=True,
                            text=True, timeout=60)
    assert "loaded" in loaded.stdout, loaded.stderr
