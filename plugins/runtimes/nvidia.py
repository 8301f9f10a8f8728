"""How a container gets the GPUs its worker gave it, as CDI "container edits" (env, device nodes, mounts, hooks),
from the first of:

1. **CDI**: a spec for ``nvidia.com/gpu`` in ``/etc/cdi`` or ``/var/run/cdi`` (``nvidia-ctk cdi generate``),
   its common edits plus those of each GPU's device (named by index or UUID);
2. **the NVIDIA Container Toolkit**: its ``nvidia-container-runtime-hook`` as a prestart hook, told the GPUs
   by ``NVIDIA_VISIBLE_DEVICES`` (what ``nvidia-container-runtime`` itself does);
3. **device nodes and driver libraries**: ``/dev/nvidia<index>``, ``nvidiactl`` and the ``nvidia-uvm``
   nodes, the driver's user-space libraries (from ``ldconfig -p``) and ``nvidia-smi``, bound read-only at
   their own paths.

A process instance gets ``CUDA_VISIBLE_DEVICES`` (:func:`environment`) instead.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from services.common.plugin_api import GpuDevice

log = logging.getLogger(__name__)
CDI_DIRS = (Path("/etc/cdi"), Path("/var/run/cdi"))
CDI_KIND = "nvidia.com/gpu"
HOOK = "nvidia-container-runtime-hook"
CONTROL_NODES = ("nvidiactl", "nvidia-uvm", "nvidia-uvm-tools", "nvidia-modeset")
#: The driver's user-space libraries a CUDA or NVML program opens (the toolkit's "compute,utility" set).
LIBRARIES = ("libcuda.so", "libnvidia-ml.so", "libnvidia-ptxjit.so", "libnvidia-nvvm.so", "libcudadebugger.so",
             "libnvidia-cfg.so", "libnvidia-opencl.so")
BINARIES = ("nvidia-smi",)
DEV_ENV = "OAK_GPU_DEV"  # where the device nodes are, when not in /dev (the tests make theirs with mknod)
Edits = dict[str, Any]  # CDI containerEdits: env, deviceNodes, mounts, hooks


def environment(devices: Iterable[GpuDevice]) -> dict[str, str]:
    """What tells CUDA (and the toolkit) which GPUs are the instance's: their UUIDs."""
    uuids = ",".join(d.uuid for d in devices)
    return {"CUDA_VISIBLE_DEVICES": uuids, "NVIDIA_VISIBLE_DEVICES": uuids} if uuids else {}


def cdi_specs(dirs: Iterable[Path] = CDI_DIRS) -> list[dict[str, Any]]:
    """The CDI specs of kind ``nvidia.com/gpu`` in *dirs* (JSON or YAML); unreadable ones are logged."""
    found = []
    for directory in dirs:
        for path in sorted(directory.glob("*")) if directory.is_dir() else []:
            if path.suffix not in (".json", ".yaml", ".yml"):
                continue
            import yaml  # only where there is a spec to read: workers without GPUs never load it

            try:
                text = path.read_text()
                spec = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
            except (OSError, ValueError, yaml.YAMLError) as exc:
                log.warning("cannot read the CDI spec %s: %s", path, exc)
                continue
            if isinstance(spec, dict) and spec.get("kind") == CDI_KIND:
                found.append(spec)
    return found


def from_cdi(specs: list[dict[str, Any]], devices: Iterable[GpuDevice]) -> list[Edits]:
    """The edits of each GPU in *specs* (by index, else UUID) after the specs' common ones; RuntimeError
    naming a GPU no spec describes."""
    edits = [spec["containerEdits"] for spec in specs if isinstance(spec.get("containerEdits"), dict)]
    for device in devices:
        entry = next((d for spec in specs for d in spec.get("devices") or []
                      if isinstance(d, dict) and d.get("name") in (str(device.index), device.uuid)), None)
        if entry is None or not isinstance(entry.get("containerEdits"), dict):
            raise RuntimeError(f"GPU {device.index} ({device.uuid}) is in no CDI spec of {CDI_KIND}; "
                               "run nvidia-ctk cdi generate again")
        edits.append(entry["containerEdits"])
    return edits


def from_toolkit(hook: str, devices: Iterable[GpuDevice]) -> list[Edits]:
    """The toolkit's prestart hook, told the GPUs and that the container needs compute and nvidia-smi."""
    env = environment(devices)
    return [{"env": [f"NVIDIA_VISIBLE_DEVICES={env['NVIDIA_VISIBLE_DEVICES']}",
                     "NVIDIA_DRIVER_CAPABILITIES=compute,utility"],
             "hooks": [{"hookName": "prestart", "path": hook, "args": [HOOK, "prestart"]}]}]


def libraries(ldconfig: str) -> list[str]:
    """The driver libraries in *ldconfig* (what ``ldconfig -p`` prints), 64-bit ones only."""
    found = []
    for line in ldconfig.splitlines():
        name, _, path = line.strip().partition(" => ")
        wide = any(arch in name for arch in ("x86-64", "AArch64", "64bit"))
        if path and wide and any(name.startswith(lib) for lib in LIBRARIES):
            found.append(path.strip())
    return sorted(set(found))


def from_devices(devices: Iterable[GpuDevice], dev: Path = Path("/dev"), libs: Iterable[str] = (),
                 binaries: Iterable[str] = ()) -> list[Edits]:
    """The GPUs' device nodes and the control nodes found in *dev* (seen at ``/dev`` inside), and *libs* and
    *binaries* bound read-only at their own paths."""
    chosen = list(devices)
    names = [f"nvidia{d.index}" for d in chosen] + [n for n in CONTROL_NODES if (dev / n).exists()]
    missing = [n for n in names[:len(chosen)] if not (dev / n).exists()]
    if missing:
        raise RuntimeError(f"no device node {dev / missing[0]} for the instance's GPU")
    nodes = [{"path": f"/dev/{n}", "hostPath": str(dev / n)} for n in names]
    mounts = [{"hostPath": p, "containerPath": p, "options": ["ro", "nosuid", "nodev", "bind"]}
              for p in [*libs, *binaries]]
    return [{"env": [f"{k}={v}" for k, v in environment(chosen).items()], "deviceNodes": nodes, "mounts": mounts}]


def edits_for(devices: tuple[GpuDevice, ...]) -> tuple[str, list[Edits]]:
    """How this machine gives a container *devices* (``cdi``, ``toolkit`` or ``devices``) and the edits."""
    specs = cdi_specs()
    if specs:
        return "cdi", from_cdi(specs, devices)
    hook = shutil.which(HOOK)
    if hook:
        return "toolkit", from_toolkit(hook, devices)
    try:
        listed = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        listed = ""
    tools = [path for name in BINARIES if (path := shutil.which(name))]
    dev = Path(os.environ.get(DEV_ENV, "/dev"))
    return "devices", from_devices(devices, dev, libraries(listed), tools)


def apply(config: dict[str, Any], edits: list[Edits]) -> None:
    """Apply CDI container *edits* to an OCI runtime *config*: variables, device nodes (allowed in the device
    cgroup), bind mounts and hooks."""
    process, linux = config.setdefault("process", {}), config.setdefault("linux", {})
    for edit in edits:
        process["env"] = [*process.get("env", []), *edit.get("env", [])]
        for node in edit.get("deviceNodes", []):
            kind, major, minor = _device(node.get("hostPath") or node["path"])
            linux.setdefault("devices", []).append({"path": node["path"], "type": kind, "major": major,
                                                    "minor": minor, "fileMode": 0o666, "uid": 0, "gid": 0})
            linux.setdefault("resources", {}).setdefault("devices", []).append(
                {"allow": True, "type": kind, "major": major, "minor": minor, "access": "rwm"})
        for mount in edit.get("mounts", []):
            config.setdefault("mounts", []).append({"destination": mount["containerPath"], "type": "bind",
                                                    "source": mount["hostPath"],
                                                    "options": list(mount.get("options") or ["ro", "bind"])})
        for hook in edit.get("hooks", []):
            entry = {k: hook[k] for k in ("path", "args", "env", "timeout") if k in hook}
            config.setdefault("hooks", {}).setdefault(hook.get("hookName", "prestart"), []).append(entry)


def ctr_args(edits: list[Edits]) -> list[str]:
    """The same *edits* as ``ctr run`` flags (ctr 1.6 runs no hooks: a CDI spec's are left out, saying so)."""
    args: list[str] = []
    for edit in edits:
        for item in edit.get("env", []):
            args += ["--env", item]
        for node in edit.get("deviceNodes", []):
            args += ["--device", node.get("hostPath") or node["path"]]
        for mount in edit.get("mounts", []):
            options = ":".join(o for o in mount.get("options") or ["ro"] if o != "bind")
            args += ["--mount", f"type=bind,src={mount['hostPath']},dst={mount['containerPath']},"
                                f"options=rbind:{options or 'ro'}"]
        if edit.get("hooks"):
            log.warning("ctr cannot run the CDI spec's hooks: the container may miss its library links")
    return args


def _device(path: str) -> tuple[str, int, int]:
    """The type (``c`` or ``b``), major and minor of the device node at *path*."""
    info = os.stat(path)
    if not (stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode)):
        raise RuntimeError(f"{path} is not a device node")
    return ("c" if stat.S_ISCHR(info.st_mode) else "b"), os.major(info.st_rdev), os.minor(info.st_rdev)
