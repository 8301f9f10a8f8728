"""The vm runtime on its own: how a VM's end is told, what it boots, and real boots of a Debian kernel with a
busybox initramfs built by the test (console as log, power-off, panic, the instance's namespace, cleanup)."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import http.server
import logging
import os
import socket
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from plugins.runtimes import vm as vm_module
from plugins.runtimes import vmimage, vmnet
from plugins.runtimes.cgroups import Cgroup
from plugins.runtimes.vm import VmRuntime, ending, kvm_problem
from services.common.plugin_api import Handle, LaunchSpec
from services.common.plugins import runtime_labels
from tests import vmimages
from tests.netlab import sh

counter = iter(range(10_000))
PANIC_CONSOLE = "[ 1.2] Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(0,0)\n"


# ---- without booting anything ------------------------------------------------------------------

@pytest.mark.parametrize(("console", "code", "expected"), [
    ("x\n[ 3.1] reboot: Power down\n", 0, (0, "the guest powered off")),
    (PANIC_CONSOLE + "[ 1.3] reboot: Restarting system\n", 0,
     (None, "kernel panic: not syncing: VFS: Unable to mount root fs on unknown-block(0,0)")),
    ("qemu-system-x86_64: terminating on signal 15 from pid 7\n", 0, (None, "QEMU was stopped by a signal")),
    ("[ 2.0] reboot: Restarting system\n", 0, (None, "the guest rebooted (QEMU runs with -no-reboot)")),
    ("qemu-system-x86_64: -kernel /x: could not open\n", 1,
     (1, "exited with code 1: qemu-system-x86_64: -kernel /x: could not open")),
    ("", -9, (-9, "killed by signal SIGKILL")),
    ("", None, (None, "QEMU exited while the worker was away (exit code unknown)")),
])
def test_how_a_vm_ended(console: str, code: int | None, expected: tuple[int | None, str]) -> None:
    """QEMU's status and the console tell a power-off (0) from a panic, a stop, a reboot and a failure."""
    end = ending(console, code)
    assert (end.code, end.reason) == expected


@pytest.mark.parametrize(("code", "arch", "expected"), [
    ("/k/a.tar.gz", (), "/k/a.tar.gz"),
    ("/k/x86.tar, /k/arm.tar", ("amd64", "arm64"), "/k/x86.tar"),
    ("/k/arm.tar,/k/x86.tar", ("arm64", "amd64"), "/k/x86.tar"),
])
def test_the_entry_for_this_architecture(code: str, arch: tuple[str, ...], expected: str) -> None:
    """Comma-separated code entries are paired with the SLA's arch list, as in Oakestra."""
    assert vmimage.pick(code, arch, "amd64") == expected


@pytest.mark.parametrize(("code", "arch", "error"), [
    ("/k/arm.tar", ("arm64",), "no kernel for amd64 in code (it has arm64)"),
    ("/k/a,/k/b", (), "code has 2 entries but the SLA gives no 'arch' to pair them with"),
    ("/k/a", ("amd64", "arm64"), "code has 1 entries for 2 architectures (amd64, arm64)"),
])
def test_no_entry_for_this_architecture(code: str, arch: tuple[str, ...], error: str) -> None:
    """Without an entry for the worker's architecture the start fails and says why."""
    with pytest.raises(RuntimeError) as err:
        vmimage.pick(code, arch, "amd64")
    assert str(err.value) == error


def test_archives_unpack_once_and_only_kernel_and_initrd(tmp_path: Path) -> None:
    """An archive gives its kernel and initrd (cached); a bare file is the kernel; bad archives say why."""
    (tmp_path / "kernel").write_bytes(b"K" * 600)
    (tmp_path / "initrd").write_bytes(b"I")
    (tmp_path / "other").write_bytes(b"O")
    bundle = tmp_path / "vm.tar.gz"
    with tarfile.open(bundle, "w:gz") as tar:
        for name in ("kernel", "initrd", "other"):
            tar.add(tmp_path / name, f"./{name}")
    cache = tmp_path / "cache"
    boot = vmimage.resolve(str(bundle), (), cache)
    assert (boot.kernel.read_bytes(), boot.initrd and boot.initrd.read_bytes()) == (b"K" * 600, b"I")
    assert not list(cache.rglob("other"))
    assert vmimage.resolve(f"file://{bundle}", ("amd64",), cache) == boot
    assert vmimage.resolve(str(tmp_path / "kernel"), (), cache) == vmimage.Boot(tmp_path / "kernel")
    empty = tmp_path / "empty.tar"
    with tarfile.open(empty, "w") as tar:
        tar.add(tmp_path / "other", "other")
    with pytest.raises(RuntimeError, match="holds no 'kernel' file"):
        vmimage.resolve(str(empty), (), cache)
    with pytest.raises(RuntimeError, match="no such file"):
        vmimage.resolve(str(tmp_path / "nothing"), (), cache)
    with pytest.raises(RuntimeError, match="use a path, or a file, http or https URL"):
        vmimage.resolve("ftp://x/k", (), cache)


def test_kernels_by_http_are_fetched_once(tmp_path: Path) -> None:
    """An http URL (Oakestra's usual code) is downloaded once into the worker's cache."""
    served = tmp_path / "www"
    served.mkdir()
    (served / "vmlinuz").write_bytes(b"kernel bytes")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/vmlinuz"
        first = vmimage.resolve(url, (), tmp_path / "cache").kernel
        (served / "vmlinuz").unlink()
        assert vmimage.resolve(url, (), tmp_path / "cache").kernel == first
        assert first.read_bytes() == b"kernel bytes"
        with pytest.raises(RuntimeError, match="cannot download"):
            vmimage.resolve(url + "2", (), tmp_path / "cache")
    finally:
        server.shutdown()


def test_network_identity_and_port_forwards() -> None:
    """The guest's ip= parameter, and the SLA's port mappings on QEMU's user network."""
    net = vmnet.GuestNet("10.18.0.2", "10.18.0.1", "255.255.255.192", "aa:bb:cc:dd:ee:ff")
    assert net.kernel_arg() == "ip=10.18.0.2::10.18.0.1:255.255.255.192::eth0:off"
    assert vmnet.user_net().kernel_arg() == "ip=10.0.2.15::10.0.2.2:255.255.255.0::eth0:off"
    assert vmnet.user_forwards("8080:80;53/udp") == ",hostfwd=tcp::8080-:80,hostfwd=udp::53-:53"
    assert vmnet.user_forwards("") == ""


def test_kvm_check_and_facts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A missing /dev/kvm means TCG; OAK_VM_ACCEL overrides; the choice becomes a node label."""
    assert kvm_problem(str(tmp_path / "kvm")) == f"{tmp_path / 'kvm'}: No such file or directory"
    monkeypatch.setenv("OAK_VM_ACCEL", "tcg")
    runtime = VmRuntime(str(tmp_path))
    if runtime.qemu:
        assert runtime.facts() == {"vm.accel": "tcg"}
        assert runtime_labels([runtime, runtime]) == ["vm.accel=tcg"]


def test_without_qemu_it_says_so_and_advertises_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    """A worker without QEMU keeps running but offers neither unikernel nor microvm, and says why."""
    monkeypatch.setattr(vm_module.shutil, "which", lambda name: None)
    with caplog.at_level(logging.WARNING):
        runtime = VmRuntime(str(tmp_path))
    assert runtime.virtualizations == ()
    assert runtime.facts() == {}
    assert "qemu-system-x86_64 is not installed, so this worker does not advertise unikernel or microvm" in caplog.text
    with pytest.raises(RuntimeError, match="QEMU is not installed"):
        runtime.prepare(launch(tmp_path, "/k", []))


def test_the_qemu_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """memory and vcpus size the VM, cmd follows the runtime's console and panic settings (and where the volumes
    go), its volumes are virtio disks, and it never reboots."""
    monkeypatch.setattr(vm_module.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setenv("OAK_VM_ACCEL", "kvm")
    runtime = VmRuntime(str(tmp_path))
    spec = launch(tmp_path, "/k", ["app=1"], memory=300, vcpus=1.5, netns="/run/netns/oak-x",
                  ip="10.18.0.2", gateway="10.18.0.1")
    net = vmnet.GuestNet("10.18.0.2", "10.18.0.1", "255.255.255.192", "aa:bb:cc:dd:ee:ff")
    spec = dataclasses.replace(spec, volumes=(("/v/data", "/data"),))
    runtime._plans[spec.iid] = vm_module.Plan(vmimage.Boot(Path("/k/kernel"), Path("/k/initrd")), net, 0,
                                              [Path("/v/data/disk.img")])
    argv = runtime.command(spec)
    assert argv[:2] == ["nsenter", "--net=/run/netns/oak-x"]
    pairs = dict(zip(argv[2:], argv[3:], strict=False))
    assert (pairs["-m"], pairs["-smp"], pairs["-accel"], pairs["-cpu"]) == ("300", "2", "kvm", "host")
    assert (pairs["-kernel"], pairs["-initrd"]) == ("/k/kernel", "/k/initrd")
    assert pairs["-append"] == ("console=ttyS0 panic=-1 ip=10.18.0.2::10.18.0.1:255.255.255.192::eth0:off "
                                "oak.volumes=vol0:/data quiet app=1")
    assert pairs["-drive"] == "file=/v/data/disk.img,if=none,id=vol0,format=raw,discard=unmap"
    devices = [argv[i + 1] for i, a in enumerate(argv) if a == "-device"]
    assert devices[1:] == ["virtio-blk-pci,drive=vol0,serial=vol0"]
    assert pairs["-netdev"].startswith(f"tap,id=net0,ifname={vmnet.TAP},")
    assert "mac=aa:bb:cc:dd:ee:ff" in devices[0]
    assert {"-no-reboot", "-nodefaults"} <= set(argv)
    assert runtime.limits(spec) == (300 + vm_module.QEMU_OVERHEAD_MB, 1.5)


# ---- real boots ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> vmimages.TestVm:
    """The Debian kernel and the test initramfs (skips, saying why, when VMs cannot boot here)."""
    return vmimages.prepare(tmp_path_factory.mktemp("vm"))


def launch(tmp_path: Path, code: str, cmd: list[str], memory: int = 128, vcpus: float = 1, one_shot: bool = False,
           netns: str = "", ip: str = "", gateway: str = "", port: str = "") -> LaunchSpec:
    iid = f"v{os.getpid()}x{next(counter)}"
    return LaunchSpec(iid, "a.b.c.d", 0, "unikernel", code, ("quiet", *cmd), (), memory, vcpus, one_shot,
                      str(tmp_path / "logs" / f"{iid}.log"), str(tmp_path / "work" / iid), port=port, netns=netns,
                      ip=ip, gateway=gateway)


async def console_shows(spec: LaunchSpec, text: str, timeout: float = 90) -> None:
    """Wait until the VM's console (the instance's log) shows *text*."""
    log = Path(spec.log_path)
    for _ in range(int(timeout * 5)):
        if log.exists() and text in log.read_text(errors="replace"):
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"{text!r} not on the console: {log.read_text(errors='replace')[-2000:]}")


def assert_gone(handle: Handle) -> None:
    """No QEMU process and no cgroup left behind."""
    assert not psutil.pid_exists(handle.pid) or psutil.Process(handle.pid).status() == psutil.STATUS_ZOMBIE
    assert not Cgroup(handle.iid).exists()


@pytest.mark.timeout(150)
async def test_console_is_the_log_and_poweroff_is_exit_0(images: vmimages.TestVm, tmp_path: Path) -> None:
    """A VM from an archive (kernel + initrd) prints to its log and powers off: exit 0, nothing left."""
    runtime = VmRuntime(str(tmp_path / "w"))
    spec = launch(tmp_path, str(images.bundle), ["oak.say=hello-console", "oak.then=poweroff"], one_shot=True)
    handle = await runtime.start(spec)
    end = await asyncio.wait_for(runtime.wait(handle), 120)
    assert (end.code, end.reason) == (0, "the guest powered off")
    assert "hello-console" in Path(spec.log_path).read_text()
    assert_gone(handle)


@pytest.mark.timeout(150)
async def test_a_kernel_panic_says_so(images: vmimages.TestVm, tmp_path: Path) -> None:
    """A kernel with nothing to run panics; QEMU ends and the reason says kernel panic."""
    runtime = VmRuntime(str(tmp_path / "w"))
    spec = launch(tmp_path, str(images.kernel), [])
    end = await asyncio.wait_for(runtime.wait(await runtime.start(spec)), 120)
    assert end.code is None
    assert end.reason.startswith("kernel panic: not syncing: VFS: Unable to mount root fs"), end.reason


@pytest.mark.timeout(150)
async def test_user_network_forwards_the_slas_port(images: vmimages.TestVm, tmp_path: Path) -> None:
    """Without an overlay the VM is on QEMU's user network and the SLA's port reaches it; stop leaves nothing."""
    runtime = VmRuntime(str(tmp_path / "w"))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    spec = launch(tmp_path, str(images.bundle), ["oak.serve=80"], port=f"{port}:80")
    handle = await runtime.start(spec)
    await console_shows(spec, "oak-serving 80")
    assert await read_from(None, "127.0.0.1", port) == "hello from the vm"
    await runtime.stop(handle, 1)
    assert_gone(handle)


@pytest.fixture
def netns_pair() -> Iterator[tuple[str, str]]:
    """An instance-like namespace (eth0 with 10.77.<n>.2/26, gateway .1) and a peer namespace holding the gateway."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    tag = f"vmt{os.getpid() % 10000}x{next(counter)}"
    inner, outer, net = f"{tag}-in", f"{tag}-out", f"10.77.{os.getpid() % 200}"
    sh("ip", "netns", "add", inner)
    sh("ip", "netns", "add", outer)
    try:
        sh("ip", "-n", outer, "link", "add", "gw0", "type", "veth", "peer", "name", "eth0", "netns", inner)
        sh("ip", "-n", outer, "addr", "add", f"{net}.1/26", "dev", "gw0")
        sh("ip", "-n", outer, "link", "set", "gw0", "up")
        sh("ip", "-n", inner, "addr", "add", f"{net}.2/26", "dev", "eth0")
        sh("ip", "-n", inner, "link", "set", "eth0", "up")
        sh("ip", "-n", inner, "route", "add", "default", "via", f"{net}.1")
        yield inner, outer
    finally:
        sh("ip", "netns", "del", inner, check=False)
        sh("ip", "netns", "del", outer, check=False)


async def read_from(netns: str | None, ip: str, port: int) -> str:
    """The answer of a TCP server, read from namespace *netns* (None: this one)."""
    prefix = ["ip", "netns", "exec", netns] if netns else []
    for _ in range(50):
        done = await asyncio.to_thread(sh, *prefix, "busybox", "nc", "-w", "3", ip, str(port), check=False)
        if done.stdout.strip():
            return done.stdout.strip()
        await asyncio.sleep(0.3)
    return ""


@pytest.mark.timeout(150)
async def test_the_vm_takes_over_the_instances_namespace(images: vmimages.TestVm, tmp_path: Path,
                                                         netns_pair: tuple[str, str]) -> None:
    """In the instance's namespace the guest gets eth0's IP and MAC through a tap; a restarted worker adopts it;
    stopping it leaves no QEMU, tap or redirect, and the namespace as it was."""
    inner, outer = netns_pair
    address = sh("ip", "-n", inner, "-o", "-4", "addr", "show", "dev", "eth0").stdout.split()[3]
    ip, gateway = address.split("/")[0], address.rsplit(".", 1)[0] + ".1"
    runtime = VmRuntime(str(tmp_path / "w"))
    spec = launch(tmp_path, str(images.bundle), ["oak.serve=80"], netns=f"/run/netns/{inner}", ip=ip, gateway=gateway)
    handle = await runtime.start(spec)
    assert vmnet.TAP in sh("ip", "-n", inner, "link", "show").stdout
    await console_shows(spec, f"oak-net {ip} via {gateway}")
    await console_shows(spec, "oak-serving 80")
    assert await read_from(outer, ip, 80) == "hello from the vm"

    restarted = VmRuntime(str(tmp_path / "w"))  # a worker killed and started again
    assert await restarted.adopt(handle)
    assert (await restarted.stats(handle)) is not None
    await restarted.stop(handle, 1)
    assert_gone(handle)
    assert vmnet.TAP not in sh("ip", "-n", inner, "link", "show").stdout
    assert "ingress" not in sh("ip", "netns", "exec", inner, "tc", "qdisc", "show", "dev", "eth0").stdout
    assert address in sh("ip", "-n", inner, "-o", "-4", "addr", "show", "dev", "eth0").stdout


def test_seed_u_and_oak_worker_unikernel_enable_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``NodeEngine -u`` and ``oak worker --unikernel`` add the vm runtime; without them it is not enabled."""
    from services.cli import commands, main
    from services.worker import seed

    configs: list[Any] = []

    async def capture(factory: Any) -> None:
        configs.append(factory())

    monkeypatch.setattr(seed, "run_until_signalled", capture)
    monkeypatch.setattr(seed, "run_worker", lambda cfg: cfg)
    base = ["--netcfg", str(tmp_path / "none.json"), "--data-dir", str(tmp_path)]
    assert seed.node_engine_main(["-u", *base]) == 0
    assert seed.node_engine_main(["-u=false", *base]) == 0
    assert [c.runtimes for c in configs] == [("process", "vm"), ("process",)]

    async def record(cfg: Any) -> None:
        configs.append(cfg)

    monkeypatch.setattr(commands, "run_worker", record)
    for argv in (["worker", "--unikernel"], ["worker", "--runtime", "container", "--unikernel"], ["worker"]):
        asyncio.run(commands.worker(main.parser().parse_args(argv), tmp_path, None))  # type: ignore[arg-type]
    assert [c.runtimes for c in configs[2:]] == [("process", "vm"), ("container", "vm"), ("process",)]
