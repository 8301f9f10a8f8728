"""The ``psutil`` collector: the node's cores, memory, CPU and disk use, from psutil."""

from __future__ import annotations

import platform
import socket
from typing import Any

import psutil

from services.common.plugin_api import hookimpl

NAME = "psutil"
ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm"}


class PsutilCollector:
    """Measures this machine."""

    name = NAME

    def __init__(self) -> None:
        psutil.cpu_percent(interval=None)  # the first call only starts the measurement

    def info(self) -> dict[str, Any]:
        """Cores, memory, architecture (Go style, as Oakestra reports it), OS and hostname."""
        machine = platform.machine()
        return {
            "cpu_cores": psutil.cpu_count() or 1,
            "memory_mb": psutil.virtual_memory().total // 2**20,
            "arch": ARCH.get(machine, machine),
            "os": platform.system().lower(),
            "kernel": platform.release(),
            "hostname": socket.gethostname(),
        }

    def sample(self) -> dict[str, Any]:
        """CPU load since the last sample, free memory, and disk use of /."""
        memory = psutil.virtual_memory()
        return {
            "cpu_percent": psutil.cpu_percent(interval=None),
            "memory_free_mb": round(memory.available / 2**20, 1),
            "memory_percent": memory.percent,
            "disk_percent": psutil.disk_usage("/").percent,
        }


@hookimpl
def oak_make_collector(name: str) -> PsutilCollector | None:
    """Build the collector when asked for it by name."""
    return PsutilCollector() if name == NAME else None
