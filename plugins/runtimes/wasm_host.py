"""Runs one WebAssembly module for the ``wasm`` runtime: the child process the worker supervises, inside the
instance's cgroup and network namespace (``python -m plugins.runtimes.wasm_host PLAN``).

*PLAN* is a JSON file the runtime writes: the module and where its compiled form is cached, the module's
argv and environment, its memory limit in bytes, and the directories it may open (host, guest). The
module's stdout and stderr are this process's (the instance's log); its exit code is this process's.
When it traps, one line saying why goes to the ``note`` file the runtime reads for the status reason.
Imports only wasmtime and the standard library, so an instance starts in some 100 ms.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import wasmtime

PAGE = 65536
TRAPPED = 134  # what wasmtime's own command exits with when a module traps


def load(engine: wasmtime.Engine, source: Path, compiled: Path) -> wasmtime.Module:
    """The module in *source* (binary or WAT text), from its compiled form in *compiled* when that is there and
    fits this wasmtime, else compiled now and kept there for the next instance."""
    if compiled.exists():
        with contextlib.suppress(wasmtime.WasmtimeError):
            return wasmtime.Module.deserialize_file(engine, str(compiled))
    data = source.read_bytes()
    binary = data if data.startswith(b"\0asm") else bytes(wasmtime.wat2wasm(data.decode()))
    module = wasmtime.Module(engine, binary)
    compiled.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=compiled.parent, delete=False) as part:
        part.write(module.serialize())
    os.replace(part.name, compiled)
    return module


def why_trapped(error: Exception, memory_pages: int, limit: int) -> str:
    """The status reason of a module that trapped: out of memory when its memory stood near *limit* (past
    three quarters: its last ``memory.grow`` was most likely refused), else what the trap says."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    cause = lines[-1] if lines else type(error).__name__
    if limit and "exceeds memory limits" in str(error):
        return f"out of memory: needs more than its {limit // 2**20} MB limit at start ({cause})"
    if limit and memory_pages * PAGE * 4 > limit * 3:
        return (f"out of memory: at {memory_pages * PAGE / 2**20:.1f} of its {limit // 2**20} MB limit "
                f"(memory.grow is refused past it), then: {cause}")
    return f"trapped: {cause}"


def run(plan: dict[str, Any]) -> int:
    """Run the module *plan* describes; return its exit code."""
    engine = wasmtime.Engine()
    module = load(engine, Path(plan["module"]), Path(plan["compiled"]))
    store = wasmtime.Store(engine)
    limit = int(plan.get("memory_bytes") or 0)
    if limit:
        store.set_limits(memory_size=limit)
    wasi = wasmtime.WasiConfig()
    wasi.argv = list(plan["argv"])
    wasi.env = [tuple(entry.split("=", 1)) for entry in plan["env"] if "=" in entry]
    wasi.inherit_stdout()
    wasi.inherit_stderr()
    for host, guest in plan["dirs"]:
        wasi.preopen_dir(host, guest)
    store.set_wasi(wasi)
    linker = wasmtime.Linker(engine)
    linker.define_wasi()
    instance = None
    try:
        instance = linker.instantiate(store, module)
        start = instance.exports(store).get("_start")
        if not isinstance(start, wasmtime.Func):
            return _noted(plan, "the module exports no _start function (it is not a WASI command)", 2)
        Path(plan["started"]).touch()  # the runtime sets the CPU quota from here on
        start(store)
        return 0
    except wasmtime.ExitTrap as exited:
        return int(exited.code)
    except (wasmtime.Trap, wasmtime.WasmtimeError) as error:
        memory = instance.exports(store).get("memory") if instance is not None else None
        pages = memory.size(store) if isinstance(memory, wasmtime.Memory) else 0
        return _noted(plan, why_trapped(error, pages, limit), TRAPPED)


def _noted(plan: dict[str, Any], reason: str, code: int) -> int:
    """Say *reason* in the log and the note; return *code*."""
    print(f"wasm: {reason}", file=sys.stderr, flush=True)
    Path(plan["note"]).write_text(reason + "\n")
    return code


def main() -> int:
    """``python -m plugins.runtimes.wasm_host PLAN``."""
    if len(sys.argv) != 2:
        print("usage: python -m plugins.runtimes.wasm_host PLAN", file=sys.stderr)
        return 2
    return run(json.loads(Path(sys.argv[1]).read_text()))


if __name__ == "__main__":
    sys.exit(main())
