"""The ``vm`` runtime: unikernels and microVMs booted by QEMU (SLA ``virtualization`` ``unikernel`` or ``microvm``).

``code`` names the kernel (or an archive with ``kernel`` and ``initrd``, per architecture: see
:mod:`plugins.runtimes.vmimage`), ``cmd`` is the kernel command line, ``memory`` (MB, default 256) and
``vcpus`` (rounded up) size the VM. The SLA's secret files reach the guest in its initramfs
(:mod:`plugins.runtimes.initramfs`), its volumes as virtio disks (:mod:`plugins.runtimes.vmdisk`).
QEMU runs with KVM when ``/dev/kvm`` works and with software emulation (TCG) otherwise; the worker's
node info says which (label ``vm.accel=kvm|tcg``), and ``OAK_VM_ACCEL=kvm|tcg`` overrides the choice.

QEMU is the supervised child (in the instance's cgroup, whose memory limit leaves room for QEMU
itself); the serial console is the instance's log. The guest gets ``console=... panic=-1`` before
``cmd`` and QEMU runs with ``-no-reboot``, so a guest that powers off, reboots or panics ends QEMU:
a power-off is exit 0 (COMPLETED for a ``one_shot`` service), a panic is DEAD with "kernel panic"
and the panic message in the reason. Networking: :mod:`plugins.runtimes.vmnet`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any

from plugins.runtimes import initramfs, vmdisk, vmimage, vmnet
from plugins.runtimes.supervised import SupervisedRuntime, describe
from services.common.plugin_api import Exit, Handle, LaunchSpec, hookimpl

log = logging.getLogger(__name__)
NAME = "vm"
DEFAULT_MEMORY_MB = 256
QEMU_OVERHEAD_MB = 256  # what QEMU itself may use above the guest's memory (TCG's code cache included)
KVM_GET_API_VERSION, KVM_CREATE_VM, KVM_API_VERSION = 0xAE00, 0xAE01, 12
PANIC = re.compile(r"Kernel panic - (.*)")
#: Per architecture: QEMU binary, machine, console device.
MACHINES = {"amd64": ("qemu-system-x86_64", "q35", "ttyS0"), "arm64": ("qemu-system-aarch64", "virt", "ttyAMA0")}


def kvm_problem(device: str = "/dev/kvm") -> str | None:
    """Why KVM cannot run ordinary guests here, or None when it can."""
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return f"{device}: {exc.strerror}"
    try:
        if fcntl.ioctl(fd, KVM_GET_API_VERSION) != KVM_API_VERSION:
            return f"{device}: unexpected KVM API version"
        os.close(fcntl.ioctl(fd, KVM_CREATE_VM, 0))
    except OSError as exc:
        return f"{device}: cannot create a VM ({exc.strerror})"
    finally:
        os.close(fd)
    if Path("/sys/module/kvm_pvm").exists():
        return "KVM here is PVM (kvm_pvm), which boots only PVM-enabled guest kernels"
    return None


def choose_accel() -> tuple[str, str]:
    """(``kvm`` or ``tcg``, why)."""
    forced = os.environ.get("OAK_VM_ACCEL", "")
    if forced in ("kvm", "tcg"):
        return forced, "set by OAK_VM_ACCEL"
    problem = kvm_problem()
    return ("tcg", problem) if problem else ("kvm", "/dev/kvm works")


def ending(console: str, code: int | None) -> Exit:
    """How a VM ended, from QEMU's exit status and what its console (and QEMU) printed last."""
    panic = PANIC.search(console)
    if panic:
        return Exit(code or None, f"kernel panic: {panic.group(1).strip()[:200]}")
    if code == 0:
        if "reboot: Power down" in console or "System halted" in console:
            return Exit(0, "the guest powered off")
        if "terminating on signal" in console:
            return Exit(None, "QEMU was stopped by a signal")
        return Exit(None, "the guest rebooted (QEMU runs with -no-reboot)")
    last = next((line.strip() for line in reversed(console.splitlines()) if "qemu" in line.lower()), "")
    reason = describe(code) if code is not None else "QEMU exited while the worker was away (exit code unknown)"
    return Exit(code, f"{reason}: {last[:200]}" if last else reason)


@dataclasses.dataclass(frozen=True)
class Plan:
    """What :meth:`VmRuntime.prepare` got ready for QEMU's command line."""

    boot: vmimage.Boot
    net: vmnet.GuestNet
    offset: int  # where this start's console begins in the instance's log
    disks: list[Path]  # the volumes' disk images, in the SLA's order


class VmRuntime(SupervisedRuntime):
    """Boots instances as QEMU virtual machines."""

    name = NAME

    def __init__(self, data_dir: str, owner: str = "") -> None:
        super().__init__(data_dir, owner)
        self.arch = vmimage.host_arch()
        binary, self.machine, self.console = MACHINES.get(self.arch, ("", "", ""))
        self.qemu = shutil.which(binary) if binary else None
        self.accel, why = choose_accel()
        self.virtualizations: tuple[str, ...] = ("unikernel", "microvm") if self.qemu else ()
        if not self.qemu:
            log.warning("vm runtime: %s is not installed, so this worker does not advertise unikernel or microvm",
                        binary or f"no QEMU for {self.arch}")
        elif self.accel == "kvm":
            log.info("vm runtime: %s with KVM (%s)", self.qemu, why)
        else:
            log.warning("vm runtime: %s with software emulation (TCG), slower than KVM: %s", self.qemu, why)
        self._plans: dict[str, Plan] = {}

    def facts(self) -> dict[str, str]:
        """What the node info says about this runtime: the acceleration its VMs get."""
        return {"vm.accel": self.accel} if self.qemu else {}

    def limits(self, spec: LaunchSpec) -> tuple[int, float]:
        """The guest's memory plus room for QEMU; the SLA's vcpus as a CPU quota."""
        return (spec.memory_mb or DEFAULT_MEMORY_MB) + QEMU_OVERHEAD_MB, spec.vcpus

    def prepare(self, spec: LaunchSpec) -> None:
        """Find the kernel and plug the network before QEMU starts."""
        if not self.qemu:
            raise RuntimeError("QEMU is not installed on this worker")
        boot = vmimage.resolve(spec.code, spec.arch, self.data_dir / "vm-images")
        if spec.secret_files:  # into its initramfs, on the instance's private tmpfs: never on a disk
            initrd = initramfs.with_files(boot.initrd, [(Path(s), t) for s, t in spec.secret_files],
                                          Path(spec.secret_dir) / "initrd")
            boot = vmimage.Boot(boot.kernel, initrd)
        sizes = spec.volume_sizes_mb or (0,) * len(spec.volumes)
        disks = [vmdisk.disk(Path(source), size) for (source, _), size in zip(spec.volumes, sizes, strict=True)]
        net = vmnet.plug(spec.netns, spec.ip, spec.gateway) if spec.netns else vmnet.user_net()
        log_path = Path(spec.log_path)
        offset = log_path.stat().st_size if log_path.exists() else 0
        self._plans[spec.iid] = Plan(boot, net, offset, disks)

    def command(self, spec: LaunchSpec) -> list[str]:
        """``qemu-system-*`` (inside the instance's namespace when it has one)."""
        plan = self._plans[spec.iid]
        boot, net = plan.boot, plan.net
        assert self.qemu is not None
        argv = ["nsenter", f"--net={spec.netns}"] if spec.netns else []
        accel = "kvm" if self.accel == "kvm" else "tcg,tb-size=64"
        argv += [self.qemu, "-name", f"oak-{spec.iid}", "-nodefaults", "-no-user-config", "-no-reboot",
                 "-machine", self.machine, "-accel", accel, "-display", "none", "-serial", "stdio",
                 "-m", str(spec.memory_mb or DEFAULT_MEMORY_MB), "-smp", str(max(1, math.ceil(spec.vcpus)))]
        if self.accel == "kvm":
            argv += ["-cpu", "host"]
        elif self.arch == "arm64":
            argv += ["-cpu", "max"]
        argv += ["-kernel", str(boot.kernel)] + (["-initrd", str(boot.initrd)] if boot.initrd else [])
        if spec.netns:
            netdev = f"tap,id=net0,ifname={vmnet.TAP},script=no,downscript=no"
        else:
            netdev = "user,id=net0" + vmnet.user_forwards(spec.port)
        device = "virtio-net-pci,netdev=net0,romfile=" + (f",mac={net.mac}" if net.mac else "")
        volumes = vmdisk.kernel_arg([target for _, target in spec.volumes])
        said = [f"console={self.console}", "panic=-1", net.kernel_arg(), volumes, *spec.cmd]
        cmdline = " ".join(arg for arg in said if arg)
        return [*argv, "-netdev", netdev, "-device", device, *vmdisk.qemu_args(plan.disks), "-append", cmdline]

    async def start(self, spec: LaunchSpec) -> Handle:
        """Boot the VM; its handle remembers the namespace and the console's start for later."""
        try:
            handle = await super().start(spec)
        except BaseException:
            self._forget(spec.iid, spec.netns)
            raise
        offset = self._plans.pop(spec.iid).offset
        data = {**handle.data, "netns": spec.netns, "log": spec.log_path, "offset": offset}
        return dataclasses.replace(handle, data=data)

    def _forget(self, iid: str, netns: str) -> None:
        self._plans.pop(iid, None)
        if netns:
            with contextlib.suppress(RuntimeError):
                vmnet.unplug(netns)

    async def wait(self, handle: Handle) -> Exit:
        """Wait for QEMU to end; tell a power-off from a panic by the console."""
        end = await super().wait(handle)
        return end if end.reason.startswith("out of memory") else ending(self._console(handle), end.code)

    @staticmethod
    def _console(handle: Handle) -> str:
        """What the VM printed since it started (its last 64 kB)."""
        path, offset = handle.data.get("log", ""), int(handle.data.get("offset", 0))
        try:
            with open(path, "rb") as console:
                size = console.seek(0, os.SEEK_END)
                console.seek(max(offset, size - 65536) if size >= offset else 0)
                return console.read().decode(errors="replace")
        except OSError:
            return ""

    def cleanup(self, handle: Handle) -> None:
        """Delete the VM's tap (the namespace itself belongs to the overlay)."""
        netns = str(handle.data.get("netns", ""))
        if netns and os.path.exists(netns):
            with contextlib.suppress(RuntimeError):
                vmnet.unplug(netns)


@hookimpl
def oak_make_runtime(name: str, config: dict[str, Any]) -> VmRuntime | None:
    """Build the vm runtime when asked for it by name (it advertises nothing when QEMU is missing)."""
    return VmRuntime(data_dir=config["data_dir"], owner=str(config.get("node", ""))) if name == NAME else None
