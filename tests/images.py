"""A busybox OCI image built on the spot (busybox-static + umoci), so no test needs a registry."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

TOOLS = ("umoci", "runc", "chroot")
BUSYBOX = Path("/bin/busybox")


def missing() -> str | None:
    """Why the image cannot be built or run here, or None."""
    if os.geteuid() != 0:
        return "containers need root"
    for tool in TOOLS:
        if shutil.which(tool) is None:
            return f"{tool} is not installed (make test installs it when run as root)"
    if not BUSYBOX.exists():
        return "busybox-static is not installed (make test installs it when run as root)"
    return None


def build_busybox(where: Path) -> Path:
    """Build an OCI archive holding busybox; return its path."""
    layout, bundle = where / "layout", where / "bundle"

    def run(*argv: str) -> None:
        subprocess.run(argv, check=True, capture_output=True, timeout=120)

    run("umoci", "init", "--layout", str(layout))
    run("umoci", "new", "--image", f"{layout}:latest")
    run("umoci", "unpack", "--image", f"{layout}:latest", str(bundle))
    rootfs = bundle / "rootfs"
    for directory in ("bin", "tmp", "proc", "sys", "dev", "etc", "var/www"):
        (rootfs / directory).mkdir(parents=True, exist_ok=True)
    shutil.copy2(BUSYBOX, rootfs / "bin" / "busybox")
    run("chroot", str(rootfs), "/bin/busybox", "--install", "-s", "/bin")
    (rootfs / "etc" / "passwd").write_text("root:x:0:0:root:/:/bin/sh\n")
    (rootfs / "var" / "www" / "index.html").write_text("hello from busybox\n")
    run("umoci", "repack", "--image", f"{layout}:latest", str(bundle))
    run("umoci", "config", "--image", f"{layout}:latest", "--config.cmd", "sh", "--config.cmd", "-c",
        "--config.cmd", "echo default command; sleep 3600", "--config.env", "IMAGE_VAR=from-image")
    archive = where / "busybox-oci.tar"
    run("tar", "-C", str(layout), "-cf", str(archive), ".")
    return archive
