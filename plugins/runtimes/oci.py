"""Which OCI runtimes a worker has, each a virtualization of its own (``"virtualization": "runsc"``).

The ``container`` runtime runs its images with runc (or containerd); every other runc-compatible
runtime found here is offered beside it under its own name, and runs the same images with the same
limits, logs, networking and re-adoption:

* on ``PATH``: ``runc``, ``crun``, ``runsc`` (gVisor), ``youki``;
* in containerd's config (``/etc/containerd/config.toml``, version 2 or 3): each runtime with a
  ``BinaryName`` option, and ``io.containerd.runsc.v1`` as ``runsc``;
* given by the operator: ``oak worker --oci-runtime NAME=PATH [FLAGS...]``, e.g.
  ``runsc-kvm=/usr/bin/runsc --platform=kvm``; the flags go before the runtime's subcommand.

Kata Containers 2 and later have no runc-compatible command (only a containerd shim), so a
``kata`` entry of containerd's config is reported as skipped rather than offered.
"""

from __future__ import annotations

import functools
import logging
import re
import shlex
import shutil
import subprocess
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from services.common.sla import VIRT_RE

log = logging.getLogger(__name__)
ON_PATH = ("runc", "crun", "runsc", "youki")
CONTAINERD_CONFIG = Path("/etc/containerd/config.toml")
#: Virtualizations other runtimes own: an OCI runtime may not take their names.
TAKEN = frozenset({"container", "docker", "process", "unikernel", "microvm", "wasm", "sim"})
GVISOR_NETNS_FIX = "20240801"  # the first gVisor release that tells namespaces apart without rmem_default
_CRI_PLUGINS = ("io.containerd.grpc.v1.cri", "io.containerd.cri.v1.runtime")


#: The flag that keeps a runtime out of cgroups, by binary: the worker makes the instance's group itself and
#: starts the runtime inside it, so the group (and its out-of-memory count) outlives the container, as runc's
#: does with ``run --keep``, which the others lack. A runtime not listed here (nor runc) makes its group
#: inside the worker's (relative to its own), where the worker's limits still hold.
LEAVE_CGROUPS = {"crun": "--cgroup-manager=disabled", "runsc": "--ignore-cgroups"}
#: What a runtime's own sandbox holds in the instance's group beside the workload, added to the SLA's memory
#: limit there: gVisor's Sentry and gofer took some 16 MB for an idle busybox.
SANDBOX_MEMORY_MB = {"runsc": 32}
# crun 1.8 refuses a hybrid host whose cgroup v2 mount holds a controller ("cgroups in hybrid mode not
# supported"); with cgroups left to the worker it only needs not to see that mount.
_HIDE_UNIFIED = ["unshare", "--mount", "--", "sh", "-c", 'umount /sys/fs/cgroup/unified 2>/dev/null; exec "$@"', "crun"]


@dataclass(frozen=True)
class OciRuntime:
    """A runc-compatible command: its name (the SLA's virtualization), binary and global flags."""

    name: str
    path: str
    flags: tuple[str, ...] = ()
    #: runsc only: its own network stack cannot start here (:func:`netstack_refused`), so its instances use the
    #: kernel's, inside their own namespace still.
    kernel_network: bool = False

    @property
    def binary(self) -> str:
        """The command's file name (``runsc``), which tells its quirks."""
        return Path(self.path).name

    @property
    def is_runc(self) -> bool:
        """True for runc, which makes the instance's cgroup itself (and keeps it with ``run --keep``)."""
        return self.binary == "runc"

    @property
    def sandbox_memory_mb(self) -> int:
        """The room this runtime's sandbox needs beside the workload's memory (see :data:`SANDBOX_MEMORY_MB`)."""
        return SANDBOX_MEMORY_MB.get(self.binary, 0)

    def argv(self, state: Path, shares_host_network: bool = False) -> list[str]:
        """The command's start, before a subcommand: binary, state directory and flags."""
        host = ["--network=host"] if self.binary == "runsc" and (shares_host_network or self.kernel_network) else []
        leave = [LEAVE_CGROUPS[self.binary]] if self.binary in LEAVE_CGROUPS else []
        wrap = _HIDE_UNIFIED if self.binary == "crun" and _hybrid_with_controllers() else []
        return [*wrap, self.path, "--root", str(state), *leave, *self.flags, *host]


def netstack_refused(path: str) -> bool:
    """True when the gVisor at *path* would refuse its own network stack in an instance's namespace: releases
    before August 2024 take a namespace for the host's when ``/proc/sys/net/core/rmem_default`` shows in it,
    which it does in every namespace on recent kernels (gVisor issue 10704: "cannot run with network enabled
    in root network namespace"). Checked once per worker start."""
    try:
        said = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10).stdout
        shown = subprocess.run(["unshare", "--net", "test", "-e", "/proc/sys/net/core/rmem_default"],
                               capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False
    release = re.search(r"(20\d{6})", said.splitlines()[0] if said else "")
    return shown and release is not None and release.group(1) < GVISOR_NETNS_FIX


def _with_quirks(runtime: OciRuntime) -> OciRuntime:
    """*runtime*, knowing what this machine needs of it (see :func:`netstack_refused`)."""
    if runtime.binary != "runsc" or "--network=host" in runtime.flags or not netstack_refused(runtime.path):
        return runtime
    log.warning("%s is too old to run its own network stack on this kernel (gVisor issue 10704); its instances "
                "use the kernel's network stack, each in its own namespace still", runtime.path)
    return replace(runtime, kernel_network=True)


def parse(option: str) -> OciRuntime:
    """``NAME=PATH [FLAGS...]`` (``--oci-runtime``) as an :class:`OciRuntime`; ValueError says what is wrong."""
    name, sep, rest = option.partition("=")
    name = name.strip()
    words = shlex.split(rest) if sep else []
    if not words:
        raise ValueError(f"--oci-runtime {option!r}: write NAME=PATH, e.g. runsc=/usr/bin/runsc")
    if not VIRT_RE.fullmatch(name) or name in TAKEN:
        raise ValueError(f"--oci-runtime {option!r}: {name!r} cannot name an OCI runtime (use [a-z0-9_-], "
                         f"not one of {', '.join(sorted(TAKEN))})")
    path = shutil.which(words[0])
    if path is None:
        raise ValueError(f"--oci-runtime {option!r}: {words[0]} is not an executable here")
    return OciRuntime(name, path, tuple(words[1:]))


def from_containerd(config: Path = CONTAINERD_CONFIG) -> list[OciRuntime]:
    """The runc-compatible runtimes containerd's *config* names (none when it is missing or unreadable)."""
    try:
        data = tomllib.loads(config.read_text())
    except FileNotFoundError:
        return []
    except (OSError, tomllib.TOMLDecodeError) as exc:
        log.warning("cannot read %s for its OCI runtimes: %s", config, exc)
        return []
    found = []
    for plugin in _CRI_PLUGINS:
        runtimes = _table(data, "plugins", plugin, "containerd", "runtimes")
        for name, entry in runtimes.items():
            if not isinstance(entry, dict) or not VIRT_RE.fullmatch(name) or name in TAKEN:
                continue
            kind = str(entry.get("runtime_type", ""))
            binary = _table(entry, "options").get("BinaryName")
            if isinstance(binary, str) and binary:
                path = shutil.which(binary)
            elif kind == "io.containerd.runsc.v1":
                path = shutil.which("runsc")
            else:
                if "kata" in kind:
                    log.info("containerd runtime %s (%s) is a shim without a runc-compatible command: not offered",
                             name, kind)
                continue
            if path:
                found.append(OciRuntime(name, path))
    return found


def discover(given: Iterable[str] = (), config: Path = CONTAINERD_CONFIG) -> dict[str, OciRuntime]:
    """Every OCI runtime this worker offers, by name: those on PATH, in containerd's config, and *given*
    (``--oci-runtime``, which win). ValueError for a bad *given* entry."""
    found: dict[str, OciRuntime] = {}
    for name in ON_PATH:
        if path := shutil.which(name):
            found[name] = OciRuntime(name, path)
    for runtime in from_containerd(config):
        found.setdefault(runtime.name, runtime)
    for option in given:
        runtime = parse(option)
        found[runtime.name] = runtime
    return {name: _with_quirks(runtime) for name, runtime in found.items()}


@functools.cache
def _hybrid_with_controllers() -> bool:
    """True on a hybrid cgroup host whose v2 mount holds a controller (crun 1.8 refuses such a host)."""
    try:
        return bool(Path("/sys/fs/cgroup/unified/cgroup.controllers").read_text().split())
    except OSError:
        return False


def _table(data: Any, *keys: str) -> dict[str, Any]:
    """``data[k1][k2]...`` when every step is a table, else ``{}``."""
    for key in keys:
        data = data.get(key) if isinstance(data, dict) else None
    return data if isinstance(data, dict) else {}

