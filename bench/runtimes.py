"""Submit-to-RUNNING on gVisor (``"virtualization": "runsc"``) and WebAssembly (``"wasm"``), issue 18, each
against the same image or module run directly in the same run.

runsc: orchestrated is ``services/deploy`` of a one-replica busybox container with ``"virtualization":
"runsc"`` through root -> cluster -> worker until the root's retained state says RUNNING (the worker's
RUNNING comes once ``runsc state`` says running). Baseline: ``umoci unpack`` + ``runsc run -d`` of the same
image with the worker's flags, until ``runsc state`` says running.

wasm: orchestrated is the same for a module that prints and sleeps (``SLEEPER`` of tests/wasm_modules.py),
until RUNNING (the host process started), and until the module runs (the host's mark in the instance's
work directory). Baseline: a fresh Python process running the module with wasmtime's API (its compiled
form cached, as the worker's) until it marks that the module runs.

Run (as root, with runc, umoci and runsc; wasmtime installed): ``.venv/bin/python -m bench.runtimes [--rounds N]``
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import record
from bench.containers import compared, direct_oci, orchestrated
from plugins.runtimes import oci
from tests import wasm_modules
from tests.images import build_busybox, missing
from tests.stack import Stack

DIRECT_WASM = """
import sys, wasmtime
from pathlib import Path
engine = wasmtime.Engine()
module = wasmtime.Module.deserialize_file(engine, sys.argv[1])
store = wasmtime.Store(engine)
store.set_wasi(wasmtime.WasiConfig())
linker = wasmtime.Linker(engine)
linker.define_wasi()
start = linker.instantiate(store, module).exports(store)["_start"]
Path(sys.argv[2]).touch()
start(store)
"""


def direct_wasm(compiled: Path, work: Path, rounds: int) -> list[float]:
    """Milliseconds for a fresh Python process with wasmtime to run the compiled module (until it marks so)."""
    out = []
    for i in range(rounds):
        mark = work / f"started-{i}"
        t0 = time.monotonic()
        child = subprocess.Popen([sys.executable, "-c", DIRECT_WASM, str(compiled), str(mark)],
                                 stdout=subprocess.DEVNULL)
        while not mark.exists():
            time.sleep(0.001)
        out.append((time.monotonic() - t0) * 1000)
        child.kill()
        child.wait()
    return out


def started_mark(stack: Stack) -> float | None:
    """When the worker's wasm instance marked that its module runs (None before); the mark is taken away, so
    the next round's instance is waited for."""
    for mark in (stack.base / "w1" / "work").glob("*/wasm-started"):
        mark.unlink()
        return time.monotonic()
    return None


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=15)
    args = p.parse_args()
    reason = missing() or (None if shutil.which("runsc") else "runsc is not installed")
    if reason:
        raise SystemExit(f"cannot run: {reason}")
    result: dict[str, Any] = {"command": f"python -m bench.runtimes --rounds {args.rounds}", "unit": "ms",
                              "goal": "orchestration adds under 100 ms at p50"}
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        image = build_busybox(base / "img")
        runsc, _ = asyncio.run(orchestrated({"virtualization": "runsc", "code": str(image), "cmd": ["sleep", "60"]},
                                            ("--runtime", "container"), base / "stack-runsc", args.rounds))
        (base / "direct-runsc").mkdir()
        direct = direct_oci(oci.discover()["runsc"], image, base / "direct-runsc", args.rounds)
        result["runsc"] = compared(runsc, "direct_umoci_runsc", direct)
        module = wasm_modules.write(base, "sleeper", wasm_modules.SLEEPER)
        wasm, runs = asyncio.run(orchestrated({"virtualization": "wasm", "code": str(module)}, ("--runtime", "wasm"),
                                              base / "stack-wasm", args.rounds, started_mark))
        (compiled,) = (base / "stack-wasm" / "w1" / "wasm" / "compiled").glob("*.cwasm")
        direct = direct_wasm(compiled, base, args.rounds)
        result["wasm"] = compared(wasm, "direct_wasmtime_module_runs", direct)
        result["wasm_until_module_runs"] = compared(runs, "direct_wasmtime_module_runs", direct)
    record("runtimes_submit_to_running", result)


if __name__ == "__main__":
    main()
