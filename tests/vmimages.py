"""A Debian kernel and a busybox initramfs built on the spot, so the vm runtime's tests need no download.

``.ci/system-deps.sh`` unpacks Debian's ``linux-image-*-cloud-amd64`` into :data:`KERNEL_CACHE` (installing
the package would pull in systemd); a kernel in ``/boot`` with its modules in ``/lib/modules`` does too.
The initramfs holds busybox, the virtio network and disk drivers (modules in Debian's kernel) and an ``/init``
whose behaviour the kernel command line chooses, so one image serves every test:

* ``oak.say=WORD``: print ``WORD`` on the console (the instance's log);
* ``oak.volumes=vol0:PATH,...``: mount each virtio disk (found by its serial) at PATH, as the vm runtime
  asks; ``oak.count=FILE``: add one to the number in FILE (a volume's) and print ``oak-boots N``;
* ``oak.show=PATH``: print ``oak-file PATH <sha256> <mode> <owner uid>`` of a file (a secret's, from the
  initramfs);
* ``oak.serve=PORT``: answer TCP connections on PORT with ``hello from the vm``;
* ``oak.http=PORT``: serve HTTP on PORT (busybox httpd), ``/ready`` answering 200;
* ``oak.then=poweroff|panic|sleep``: afterwards power off (exit 0), panic (init exits) or idle.

The network is configured from Debian's ``ip=<ip>::<gateway>:<netmask>::eth0:off`` parameter, as
initramfs-tools would.
"""

from __future__ import annotations

import gzip
import os
import shutil
import stat
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from plugins.runtimes.initramfs import Cpio

KERNEL_CACHE = Path("/var/cache/oakling/vm-kernel")
BUSYBOX = Path("/bin/busybox")
MODULES = ("virtio_pci", "virtio_net", "virtio_blk")
INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mkdir -p /proc /sys /dev /tmp
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev 2>/dev/null
for m in $(cat /modules/order); do insmod /modules/$m.ko 2>/dev/null; done
arg() { for w in $(cat /proc/cmdline); do case "$w" in "$1"=*) echo "${w#*=}";; esac; done; }
net=$(arg ip)
if [ -n "$net" ]; then
  IFS=: read addr _ gw mask _ dev _ <<EOF
$net
EOF
  for i in 1 2 3 4 5 6 7 8 9 10; do [ -e /sys/class/net/$dev ] && break; sleep 0.2; done
  ip link set lo up; ip link set "$dev" up
  ifconfig "$dev" "$addr" netmask "$mask" up
  [ -n "$gw" ] && route add default gw "$gw"
  echo "oak-net $addr via $gw"
fi
for v in $(arg oak.volumes | tr , ' '); do
  serial=${v%%:*}; where=${v#*:}
  for i in 1 2 3 4 5 6 7 8 9 10; do
    dev=$(grep -l "^$serial\$" /sys/block/vd*/serial 2>/dev/null | cut -d/ -f4); [ -n "$dev" ] && break; sleep 0.2
  done
  mkdir -p "$where" && mount -t ext4 "/dev/$dev" "$where" && echo "oak-volume $serial /dev/$dev $where"
done
count=$(arg oak.count)
if [ -n "$count" ]; then
  n=$(( $(cat "$count" 2>/dev/null || echo 0) + 1 )); echo "$n" > "$count"; sync; echo "oak-boots $n"
fi
say=$(arg oak.say); [ -n "$say" ] && echo "$say"
show=$(arg oak.show)
[ -n "$show" ] && echo "oak-file $show $(sha256sum < "$show" | cut -d' ' -f1) $(stat -c '%a %u' "$show")"
port=$(arg oak.serve)
if [ -n "$port" ]; then
  echo 'echo hello from the vm' > /tmp/answer; chmod +x /tmp/answer
  nc -ll -p "$port" -e /tmp/answer &
  echo "oak-serving $port"
fi
http=$(arg oak.http)
if [ -n "$http" ]; then
  mkdir -p /www && echo ready > /www/ready && httpd -p "$http" -h /www && echo "oak-http $http"
fi
case "$(arg oak.then)" in
  poweroff) poweroff -f ;;
  panic) echo "oak-panicking"; exit 1 ;;
esac
while :; do sleep 3600; done
"""


def find_kernel() -> tuple[Path, Path] | None:
    """A bootable Debian kernel and its modules directory: the unpacked cache first, then ``/boot``."""
    for base in (KERNEL_CACHE, Path("/")):
        for image in sorted((base / "boot").glob("vmlinuz-*"), reverse=True):
            modules = base / "lib" / "modules" / image.name.removeprefix("vmlinuz-")
            if modules.is_dir():
                return image, modules
    return None


def missing() -> str | None:
    """Why a VM cannot be booted here, or None."""
    if os.geteuid() != 0:
        return "the vm runtime's tests need root (cgroups, network namespaces, /dev/kvm)"
    if shutil.which("qemu-system-x86_64") is None:
        return "QEMU is not installed (make test installs qemu-system-x86 when run as root)"
    if not BUSYBOX.exists():
        return "busybox-static is not installed (make test installs it when run as root)"
    if find_kernel() is None:
        return f"no Debian kernel in {KERNEL_CACHE} or /boot (make test unpacks one when run as root)"
    return None


def _module_files(modules: Path) -> dict[str, Path]:
    """Every module of the kernel by name (``-`` spelled ``_``)."""
    return {p.name.removesuffix(".ko").replace("-", "_"): p for p in (modules / "kernel").rglob("*.ko")}


def _depends(module: Path) -> list[str]:
    """The modules *module* needs, from its ``depends=`` modinfo string."""
    data = module.read_bytes()
    start = data.find(b"\0depends=")
    if start < 0:
        return []
    value = data[start + 9:data.index(b"\0", start + 9)].decode()
    return [name.replace("-", "_") for name in value.split(",") if name]


def _load_order(modules: Path, wanted: tuple[str, ...]) -> list[tuple[str, Path]]:
    """*wanted* and what they depend on, dependencies first."""
    files = _module_files(modules)
    order: list[tuple[str, Path]] = []

    def visit(name: str) -> None:
        if name not in files or any(n == name for n, _ in order):
            return  # built into the kernel, or already placed
        for dependency in _depends(files[name]):
            visit(dependency)
        order.append((name, files[name]))

    for name in wanted:
        visit(name)
    return order


def build_initramfs(where: Path, modules: Path) -> Path:
    """Write the test initramfs (gzip'd cpio) into *where*; return its path."""
    archive = Cpio()
    for directory in ("bin", "dev", "proc", "sys", "tmp", "modules"):
        archive.add(directory, stat.S_IFDIR | 0o755)
    archive.add("bin/busybox", stat.S_IFREG | 0o755, BUSYBOX.read_bytes())
    archive.add("bin/sh", stat.S_IFLNK | 0o777, b"busybox")
    archive.add("init", stat.S_IFREG | 0o755, INIT.encode())
    order = _load_order(modules, MODULES)
    for name, path in order:
        archive.add(f"modules/{name}.ko", stat.S_IFREG | 0o644, path.read_bytes())
    archive.add("modules/order", stat.S_IFREG | 0o644, "\n".join(n for n, _ in order).encode() + b"\n")
    path = where / "initrd.img"
    path.write_bytes(gzip.compress(archive.bytes(), compresslevel=1))
    return path


def build_bundle(where: Path, kernel: Path, initrd: Path) -> Path:
    """A ``tar.gz`` holding ``kernel`` and ``initrd``, as the SLA's ``code`` may name."""
    path = where / "vm.tar.gz"
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        tar.add(kernel, "kernel")
        tar.add(initrd, "initrd")
    return path


@dataclass(frozen=True)
class TestVm:
    """What the tests boot: the kernel alone, the initramfs, and both in a tar.gz."""

    kernel: Path
    initrd: Path
    bundle: Path


def prepare(where: Path) -> TestVm:
    """Build the initramfs and the bundle into *where* (skip the test, saying why, when VMs cannot boot here)."""
    reason = missing()
    if reason:
        pytest.skip(reason)
    found = find_kernel()
    assert found is not None
    where.mkdir(parents=True, exist_ok=True)
    kernel, modules = found
    initrd = build_initramfs(where, modules)
    return TestVm(kernel, initrd, build_bundle(where, kernel, initrd))
