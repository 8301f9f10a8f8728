"""The NVIDIA GPUs of this worker (what it reports), and which instance holds which (what it hands out).

Found with ``nvidia-smi --query-gpu`` (``OAK_NVIDIA_SMI`` names another binary). An instance asking for
``vgpus`` gets that many whole GPUs no other instance of this worker holds, and keeps them across its
restarts until it is removed; the runtime is told their index and UUID (:class:`GpuDevice`).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass

from services.common.plugin_api import GpuDevice

log = logging.getLogger(__name__)
QUERY = ("--query-gpu=index,uuid,name,memory.total", "--format=csv,noheader,nounits")
SMI_ENV = "OAK_NVIDIA_SMI"


@dataclass(frozen=True)
class Gpu:
    """One GPU as ``nvidia-smi`` shows it."""

    index: int
    uuid: str
    name: str
    memory_mb: int

    @property
    def device(self) -> GpuDevice:
        """What a runtime needs to give it to an instance."""
        return GpuDevice(self.index, self.uuid)


def parse(text: str) -> list[Gpu]:
    """The GPUs in *text*, the CSV ``nvidia-smi`` prints for :data:`QUERY`; ValueError for a line it is not."""
    found = []
    for line in text.splitlines():
        if not line.strip():
            continue
        fields = [field.strip() for field in line.split(",")]
        if len(fields) != 4 or not fields[1].startswith("GPU-"):
            raise ValueError(f"unexpected nvidia-smi line {line.strip()!r:.120}")
        index, uuid, name, memory = fields
        found.append(Gpu(int(index), uuid, name, int(float(memory)) if memory.replace(".", "").isdigit() else 0))
    return found


def discover() -> list[Gpu]:
    """This machine's NVIDIA GPUs ([] without ``nvidia-smi`` or when it fails, saying why in the log)."""
    smi = os.environ.get(SMI_ENV) or shutil.which("nvidia-smi")
    if not smi:
        return []
    try:
        done = subprocess.run([smi, *QUERY], capture_output=True, text=True, timeout=30, check=False)
        if done.returncode != 0:
            raise ValueError((done.stderr or done.stdout).strip()[:200] or f"exit code {done.returncode}")
        gpus = parse(done.stdout)
    except (OSError, subprocess.TimeoutExpired, ValueError) as exc:
        log.warning("nvidia-smi is installed but cannot list the GPUs (%s): this worker offers none", exc)
        return []
    if gpus:
        log.info("GPUs: %s", ", ".join(f"{g.index}: {g.name} ({g.memory_mb} MB)" for g in gpus))
    return gpus


def summary(gpus: list[Gpu]) -> tuple[int, str, int]:
    """(count, model, memory per GPU in MB) for the node info: the models joined when they differ, the
    smallest memory (what any one of them holds)."""
    if not gpus:
        return 0, "", 0
    models = list(dict.fromkeys(g.name for g in gpus))
    return len(gpus), " + ".join(models), min(g.memory_mb for g in gpus)


def assign(gpus: list[Gpu], held: Iterable[str], count: int) -> tuple[Gpu, ...]:
    """*count* GPUs none of whose UUIDs are *held*, lowest index first; RuntimeError when too few are free."""
    taken = set(held)
    free = [g for g in sorted(gpus, key=lambda g: g.index) if g.uuid not in taken]
    if count > len(free):
        raise RuntimeError(f"needs {count} GPU(s); this worker has {len(gpus)}, {len(free)} free")
    return tuple(free[:count])
