"""A VM's volumes: each an ext4 disk image in the volume's directory on the worker, given to the guest as
a virtio disk.

A container or process mounts the volume's directory; a VM cannot, so the directory holds ``disk.img``,
made sparse at the SLA's ``size_mb`` (DEFAULT_MB without) and formatted ext4 on first use, then kept
with the volume (across restarts, updates and worker restarts; deleted with it). The i-th volume is
the guest's i-th virtio disk (``vda``, ``vdb``, ...) with serial ``vol<i>``, and the kernel command line
says where each goes: ``oak.volumes=vol0:/var/lib/app,vol1:/data``; the guest's init mounts them.
QEMU locks an image while it runs, so one VM at a time uses a volume on a worker.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

IMAGE = "disk.img"
DEFAULT_MB = 1024


def disk(directory: Path, size_mb: int = 0) -> Path:
    """The volume's disk image in *directory*, made (sparse) and formatted when it is not there yet."""
    image = directory / IMAGE
    if image.exists():
        return image
    mkfs = shutil.which("mkfs.ext4") or shutil.which("mkfs.ext4", path="/usr/sbin:/sbin")  # a user's PATH may lack it
    if mkfs is None:
        raise RuntimeError("a VM's volume is an ext4 disk image, and mkfs.ext4 is not installed on this worker "
                           "(apt-get install e2fsprogs)")
    making = directory / f".{IMAGE}.new"
    with making.open("wb") as sparse:
        sparse.truncate((size_mb or DEFAULT_MB) << 20)
    done = subprocess.run([mkfs, "-q", "-F", "-m", "0", str(making)], capture_output=True, text=True, timeout=120,
                          check=False)
    if done.returncode != 0:
        making.unlink(missing_ok=True)
        raise RuntimeError(f"cannot format the volume's disk: {done.stderr.strip()[:200]}")
    making.rename(image)  # whole or not at all: a worker killed half way leaves no half-made disk in use
    return image


def qemu_args(images: list[Path]) -> list[str]:
    """QEMU's arguments attaching *images* as virtio disks with serials ``vol0``, ``vol1``, ..."""
    args: list[str] = []
    for i, image in enumerate(images):
        args += ["-drive", f"file={image},if=none,id=vol{i},format=raw,discard=unmap",
                 "-device", f"virtio-blk-pci,drive=vol{i},serial=vol{i}"]
    return args


def kernel_arg(targets: list[str]) -> str:
    """``oak.volumes=vol0:PATH,...`` for the guest's init ("" without volumes)."""
    return "oak.volumes=" + ",".join(f"vol{i}:{path}" for i, path in enumerate(targets)) if targets else ""
