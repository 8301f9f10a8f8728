"""The wasm runtime on the real wasmtime: modules built from WAT text at test time print to the log, exit
with their codes, see their argv and environment, are refused memory past their limit, are throttled to
their vCPUs, come from paths, file:// and http:// URLs (cached by digest), and pass the conformance suite."""

from __future__ import annotations

import asyncio
import functools
import http.server
import os
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from plugins.conformance import RuntimeConformance
from plugins.runtimes.cgroups import Cgroup, group_name
from plugins.runtimes.wasm import WasmRuntime
from services.common.plugin_api import LaunchSpec, Runtime
from tests import wasm_modules as modules
from tests.conftest import dumps, eventually, sla
from tests.stack import REPO, Stack, oak
from tests.test_containers_e2e import plain_and
from tests.test_three_tiers import running, state

wasmtime = pytest.importorskip("wasmtime", reason="the wasm runtime needs the wasmtime package")
pytestmark = pytest.mark.timeout(60)
counter = iter(range(10_000))


def launch(tmp_path: Path, code: Path | str, cmd: tuple[str, ...] = (), memory: int = 0, vcpus: float = 0,
           env: tuple[str, ...] = ()) -> LaunchSpec:
    iid = f"wasm{os.getpid()}x{next(counter)}"
    return LaunchSpec(iid, "a.b.c.d", 2, "wasm", str(code), cmd, env, memory, vcpus, False,
                      str(tmp_path / "logs" / f"{iid}.log"), str(tmp_path / "work" / iid))


async def test_hello_world_in_the_log_and_the_exit_code(tmp_path: Path) -> None:
    """What the module prints is the log; its exit code is the instance's (0 for a one_shot's COMPLETED)."""
    rt = WasmRuntime(str(tmp_path / "w"))
    spec = launch(tmp_path, modules.write(tmp_path, "hello", modules.hello()))
    end = await rt.wait(await rt.start(spec))
    assert (end.code, end.reason) == (0, "exited with code 0")
    assert Path(spec.log_path).read_text() == "hello from wasm\n"
    failing = launch(tmp_path, modules.write(tmp_path, "fail", modules.say((1, "out"), (2, "err"), code=3)))
    end = await rt.wait(await rt.start(failing))
    assert (end.code, end.reason) == (3, "exited with code 3")
    assert sorted(Path(failing.log_path).read_text().split()) == ["err", "out"]


async def test_argv_and_environment(tmp_path: Path) -> None:
    """``cmd`` is the module's argv and ``environment`` its environment (with HOSTNAME)."""
    rt = WasmRuntime(str(tmp_path / "w"))
    spec = launch(tmp_path, modules.write(tmp_path, "counts", modules.COUNTS), cmd=("counts", "a", "b"),
                  env=("GREETING=hi", "MORE=yes"))
    end = await rt.wait(await rt.start(spec))
    assert end.code == 3 * 10 + 3, "3 arguments, 3 variables (GREETING, MORE, HOSTNAME)"
    bare = await rt.wait(await rt.start(launch(tmp_path, tmp_path / "counts.wat")))
    assert bare.code == 1 * 10 + 1, "argv is the module's name alone without a cmd"


async def test_a_memory_hog_is_refused_with_a_clear_reason(tmp_path: Path) -> None:
    """wasmtime's store limit refuses ``memory.grow`` past ``memory``; the module traps; the reason says why."""
    rt = WasmRuntime(str(tmp_path / "w"))
    spec = launch(tmp_path, modules.write(tmp_path, "hog", modules.MEMORY_HOG), memory=16)
    end = await rt.wait(await rt.start(spec))
    assert end.code == 134, end
    assert end.reason.startswith("out of memory: at 15.1 of its 16 MB limit (memory.grow is refused past it), "
                                 "then: wasm trap: wasm `unreachable` instruction executed"), end.reason
    assert "out of memory" in Path(spec.log_path).read_text(), "the log says so too"
    big = modules.write(tmp_path, "big", "(module (memory (export \"memory\") 512) (func (export \"_start\")))")
    end = await rt.wait(await rt.start(launch(tmp_path, big, memory=16)))
    assert end.reason.startswith("out of memory: needs more than its 16 MB limit at start"), end.reason


async def test_a_cpu_hog_is_throttled(tmp_path: Path) -> None:
    """A spinning module limited to 0.2 vCPU uses about a fifth of a core (its host is in the instance's
    cgroup), is throttled, and stopping it leaves no group."""
    if os.geteuid() != 0:
        pytest.skip("cgroup limits need root")
    rt = WasmRuntime(str(tmp_path / "w"))
    spec = launch(tmp_path, modules.write(tmp_path, "spin", modules.CPU_HOG), vcpus=0.2)
    handle = await rt.start(spec)
    await asyncio.sleep(1.0)  # the host's start (Python, wasmtime, compiling) is over by then
    first = Cgroup(spec.iid).usage()
    await asyncio.sleep(2.0)
    second = Cgroup(spec.iid).usage()
    await rt.stop(handle, 0.5)
    assert first is not None
    assert second is not None
    share = (second.cpu_seconds - first.cpu_seconds) / (second.at - first.at)
    assert 0.1 < share < 0.3, f"used {share:.2f} of a core with a 0.2 quota"
    assert second.throttled > first.throttled
    assert not Cgroup(spec.iid).exists()


@pytest.fixture
def web(tmp_path: Path) -> Iterator[str]:
    """An HTTP server on loopback serving *tmp_path*; its base URL."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


async def test_modules_from_paths_and_urls_are_cached_by_digest(tmp_path: Path, web: str) -> None:
    """A binary ``.wasm`` by ``file://``, the same bytes by ``http://`` and by path: one module kept, compiled
    once; a missing one fails readably."""
    binary = tmp_path / "hello.wasm"
    binary.write_bytes(bytes(wasmtime.wat2wasm(modules.hello("from a binary"))))
    rt = WasmRuntime(str(tmp_path / "w"))
    for code in (f"file://{binary}", f"{web}/hello.wasm", str(binary)):
        spec = launch(tmp_path, code)
        end = await rt.wait(await rt.start(spec))
        assert end.code == 0, (code, end)
        assert Path(spec.log_path).read_text() == "from a binary\n"
    assert len(list((rt.cache / "modules").iterdir())) == 1, "kept once, by digest"
    assert len(list((rt.cache / "compiled").iterdir())) == 1, "compiled once"
    with pytest.raises(RuntimeError, match="no such file"):
        await rt.start(launch(tmp_path, tmp_path / "missing.wasm"))
    with pytest.raises(RuntimeError, match="cannot download"):
        await rt.start(launch(tmp_path, f"{web}/missing.wasm"))


class TestWasmRuntime(RuntimeConformance):
    """The conformance suite, each behaviour a module (a module cannot handle SIGTERM: "ignore-term" is a
    module that runs until killed)."""

    limits_memory = True
    BEHAVIOURS = {
        "fail": modules.say((1, "out"), (2, "err"), code=3),
        "succeed": modules.hello(),
        "run": modules.SLEEPER,
        "ignore-term": modules.SLEEPER,
        "allocate": modules.MEMORY_HOG,
    }

    def make_runtime(self, data_dir: Path) -> Runtime:
        return WasmRuntime(str(data_dir))

    def make_spec(self, tmp_path: Path, behaviour: str, memory_mb: int = 0) -> LaunchSpec:
        spec = super().make_spec(tmp_path, behaviour, memory_mb)
        text = self.BEHAVIOURS.get(behaviour)
        code = modules.write(tmp_path, behaviour, text) if text else tmp_path / "missing.wasm"
        return replace(spec, code=str(code), cmd=())


@pytest.mark.timeout(120)
async def test_wasm_services_through_the_stack(stack: Stack, api: Any, tmp_path: Path) -> None:
    """``"virtualization": "wasm"`` is placed only on the worker running the wasm runtime; a one_shot module
    COMPLETES and its output is its log (``oak service logs``); a memory hog is DEAD saying out of memory;
    deleting the application leaves no cgroup."""
    client = await plain_and(stack, api, "wasmer", "wasm")

    def module(name: str, text: str, **extra: Any) -> dict[str, Any]:
        return {"microservice_name": name, "virtualization": "wasm", "code": str(modules.write(tmp_path, name, text)),
                **extra}

    doc = sla(module("hello", modules.hello(), one_shot=True), module("hog", modules.MEMORY_HOG, memory=16),
              module("idle", modules.SLEEPER), app="mods")
    await client.request("apps", "create", raw=dumps(doc))
    for name, replicas in (("hello", 1), ("hog", 1), ("idle", 2)):
        await client.request("services", "deploy", {"service": f"mods.test.{name}.test", "replicas": replicas})
    idle = await running(client, "mods.test.idle.test", 2, "idle modules", timeout=60)
    assert {i["node"] for i in idle["instances"]} == {"wasmer"}, "never placed on a worker without wasm"

    async def completed() -> bool:
        return (await state(client, "mods.test.hello.test"))["status"] == "COMPLETED"

    await eventually(completed, 30, what="hello COMPLETED")
    done = subprocess.run(oak("service", "logs", "mods.test.hello.test", "0", "--data-dir", str(stack.base / "root")),
                          capture_output=True, text=True, cwd=REPO, timeout=30)
    assert (done.returncode, done.stdout.strip()) == (0, "hello from wasm"), done.stderr

    async def refused() -> str:
        (hog,) = (await state(client, "mods.test.hog.test"))["instances"]
        return str(hog["reason"]) if hog["reason"].startswith("out of memory: at ") else ""

    assert "16 MB limit" in await eventually(refused, 30, what="the hog refused its memory")
    await client.request("apps", "delete", {"app": "mods"})

    def nothing_left() -> bool:
        return not any(Cgroup(group_name(i["iid"], "wasmer")).exists() for i in idle["instances"])

    await eventually(nothing_left, 30, what="no cgroup left")
