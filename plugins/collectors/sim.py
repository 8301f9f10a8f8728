"""``sim``: a simulated collector for testbeds: a fixed 4-core, 8 GB machine with a little load."""

from __future__ import annotations

import random
from typing import Any

from services.common.plugin_api import hookimpl

NAME = "sim"


class SimCollector:
    """Reports a made-up machine (cheap: no system calls)."""

    name = NAME

    def info(self) -> dict[str, Any]:
        """A 4-core, 8 GB amd64 machine."""
        return {"cpu_cores": 4, "memory_mb": 8192, "arch": "amd64", "os": "linux", "hostname": "sim"}

    def sample(self) -> dict[str, Any]:
        """A light, slightly varying load."""
        return {"cpu_percent": round(random.uniform(1, 5), 1), "memory_free_mb": 7000.0, "memory_percent": 15.0,
                "disk_percent": 10.0}


@hookimpl
def oak_make_collector(name: str) -> SimCollector | None:
    """Build the collector when asked for it by name."""
    return SimCollector() if name == NAME else None
