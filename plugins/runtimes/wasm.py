"""The ``wasm`` runtime: WebAssembly modules (WASI commands) on wasmtime, ``"virtualization": "wasm"``.

``code`` is a ``.wasm`` or ``.wat`` file: a local path, a ``file://`` URL or an ``http(s)://`` URL (fetched
once). Modules are kept by the SHA-256 of their bytes, and compiled once per module and wasmtime version.
``cmd`` is the module's argv (its name when empty), ``environment`` (and secrets given as ``env``) its
environment, stdout and stderr its log; its exit code ends the instance as a process's does (0 is
COMPLETED for a ``one_shot``).

Each instance is a child process (:mod:`plugins.runtimes.wasm_host`) in the instance's cgroup, so ``vcpus``
is a CPU quota and the host's memory is limited, and in its network namespace. ``memory`` is the module's
own limit, enforced by wasmtime's store limits: a ``memory.grow`` past it is refused, and a module that
then traps is DEAD with ``out of memory: at 15.1 of its 16 MB limit (memory.grow is refused past it)``.
The cgroup holds that plus room for the Python host and wasmtime. Modules are WASI preview 1, which opens
no sockets (and wasmtime's Python API preopens none), so a module cannot listen or connect (its service IP
and port mappings have nothing to reach; docs/runtimes.md); volumes are preopened at their paths and the
instance's work directory at ``/tmp``.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import json
import os
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

from plugins.runtimes.download import fetch
from plugins.runtimes.supervised import READY_TIMEOUT, SupervisedRuntime
from services.common.plugin_api import Exit, Handle, LaunchSpec, hookimpl
from services.common.private import private_dir, write_mode

NAME = "wasm"
#: Room in the instance's cgroup beside the module's memory: the Python host with wasmtime took 28 MB.
HOST_MEMORY_MB = 48
STARTED = "wasm-started"  # the host makes it in the instance's work directory once the module runs


class WasmRuntime(SupervisedRuntime):
    """Runs WebAssembly modules on wasmtime, each in a child process of its own."""

    name = NAME
    virtualizations = (NAME,)

    def __init__(self, data_dir: str, owner: str = "") -> None:
        super().__init__(data_dir, owner)
        self.cache = self.data_dir / "wasm"

    @staticmethod
    def unavailable() -> str | None:
        """Why modules cannot run here, or None."""
        if importlib.util.find_spec("wasmtime") is None:
            return "the wasm runtime needs the wasmtime package (pip install wasmtime)"
        return None

    def limits(self, spec: LaunchSpec) -> tuple[int, float]:
        """The module's memory plus room for its host process; the SLA's vcpus as a CPU quota."""
        return (spec.memory_mb + HOST_MEMORY_MB if spec.memory_mb else 0), spec.vcpus

    def module(self, code: str) -> Path:
        """The module behind *code*, kept under the SHA-256 of its bytes."""
        data = fetch(code, self.cache).read_bytes()
        kind = "wasm" if data.startswith(b"\0asm") else "wat"
        kept = self.cache / "modules" / f"{hashlib.sha256(data).hexdigest()}.{kind}"
        if not kept.exists():
            kept.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=kept.parent, delete=False) as part:
                part.write(data)
            os.replace(part.name, kept)
        return kept

    def _plan_path(self, spec: LaunchSpec) -> Path:
        return Path(spec.secret_dir or spec.work_dir) / "wasm-plan.json"

    def _note(self, spec: LaunchSpec) -> Path:
        return Path(spec.work_dir) / "wasm-exit"

    def prepare(self, spec: LaunchSpec) -> None:
        """Fetch the module and write the host's plan (private: it holds the environment)."""
        reason = self.unavailable()
        if reason:
            raise RuntimeError(reason)
        if spec.secret_files:
            raise RuntimeError("a wasm module opens directories, not single files: give its secrets as env")
        module = self.module(spec.code)
        private_dir(Path(spec.work_dir))
        self._note(spec).unlink(missing_ok=True)
        (Path(spec.work_dir) / STARTED).unlink(missing_ok=True)
        plan = {
            "module": str(module),
            "compiled": str(self.cache / "compiled" / f"{module.stem}-{metadata.version('wasmtime')}.cwasm"),
            "argv": list(spec.cmd) or [Path(spec.code).name],
            "env": [f"HOSTNAME=instance-{spec.instance_number}", *spec.environment, *spec.secret_env],
            "memory_bytes": spec.memory_mb * 2**20,
            "dirs": [[spec.work_dir, "/tmp"], *([source, target] for source, target in spec.volumes)],
            "note": str(self._note(spec)),
            "started": str(Path(spec.work_dir) / STARTED),
        }
        write_mode(self._plan_path(spec), json.dumps(plan), 0o600)

    def command(self, spec: LaunchSpec) -> list[str]:
        """The host process, entered into the instance's network namespace when it has one."""
        enter = ["nsenter", f"--net={spec.netns}"] if spec.netns and self.sandboxed else []
        return [*enter, sys.executable, "-m", "plugins.runtimes.wasm_host", str(self._plan_path(spec))]

    async def ready(self, child: asyncio.subprocess.Process) -> None:
        """Return once the host runs the module (it marks its working directory), so the CPU quota limits the
        module and not the host's start (Python, wasmtime, compiling), at most READY_TIMEOUT after start."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + READY_TIMEOUT
        marker = Path(f"/proc/{child.pid}/cwd") / STARTED
        while child.returncode is None and loop.time() < deadline and not await asyncio.to_thread(marker.exists):
            await asyncio.sleep(0.005)

    def remembered(self, spec: LaunchSpec) -> dict[str, Any]:
        """Where the host leaves its note (why a module trapped)."""
        return {"note": str(self._note(spec))}

    async def wait(self, handle: Handle) -> Exit:
        """As for a process, with the host's note (a trap, a refused ``memory.grow``) as the reason."""
        end = await super().wait(handle)
        said = _take(str(handle.data.get("note", "")))
        return Exit(end.code, f"{said} ({end.reason})") if said else end


def _take(path: str) -> str:
    """The note at *path*, removed (empty when there is none)."""
    if not path:
        return ""
    try:
        with open(path) as note:
            said = note.read().strip()
        os.unlink(path)
    except OSError:
        return ""
    return said


@hookimpl
def oak_make_runtime(name: str, config: dict[str, Any]) -> WasmRuntime | None:
    """Build the wasm runtime when asked for it by name."""
    if name != NAME:
        return None
    runtime = WasmRuntime(data_dir=config["data_dir"], owner=str(config.get("node", "")))
    reason = runtime.unavailable()
    if reason:
        raise ValueError(reason)
    return runtime
