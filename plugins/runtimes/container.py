"""The ``container`` runtime: OCI containers run by runc, from local OCI images or pulled ones.

``code`` names the image:

* a local OCI image layout, ``/path/to/layout[:tag]`` (or ``oci:/path[:tag]``);
* a local OCI archive (a tar of a layout), ``/path/to/image.tar[:tag]`` (or ``oci-archive:...``);
* a registry reference such as ``docker.io/library/nginx:latest``, pulled with skopeo into the
  worker's image cache when skopeo is installed and the registry is reachable.

Each instance gets a bundle unpacked with umoci, a config with the SLA's ``cmd`` (replacing the
image's command), ``environment``, memory limit and CPU quota (in the cgroup ``oakling/<iid>``,
next to the process runtime's) and, with ``privileged``, every capability. ``runc run --keep`` is the
supervised child, so the exit status is the container's and its cgroup outlives it long enough to
tell an out-of-memory kill. Stopping is ``runc kill TERM``, then ``KILL`` after the grace period;
``runc delete`` and removing the bundle leave nothing behind. With the overlay the container joins
the instance's network namespace; without it, it shares the worker's.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import shutil
import subprocess
import tarfile
import uuid
from pathlib import Path
from typing import Any

from plugins.runtimes.cgroups import CPU_PERIOD_US, relative_path
from plugins.runtimes.supervised import SupervisedRuntime
from services.common.hookspecs import Handle, LaunchSpec, hookimpl

log = logging.getLogger(__name__)
NAME = "container"
TOOL_TIMEOUT = 300
START_TIMEOUT = 30.0
ALL_CAPS = ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL",
            "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE", "CAP_NET_BIND_SERVICE",
            "CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_IPC_LOCK", "CAP_IPC_OWNER",
            "CAP_SYS_MODULE", "CAP_SYS_RAWIO", "CAP_SYS_CHROOT", "CAP_SYS_PTRACE", "CAP_SYS_PACCT",
            "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_NICE", "CAP_SYS_RESOURCE", "CAP_SYS_TIME",
            "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE", "CAP_AUDIT_WRITE", "CAP_AUDIT_CONTROL",
            "CAP_SETFCAP", "CAP_MAC_OVERRIDE", "CAP_MAC_ADMIN", "CAP_SYSLOG", "CAP_WAKE_ALARM",
            "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ"]


def _run(*argv: str) -> str:
    """Run a tool; raise RuntimeError with its message when it fails."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=TOOL_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeError(f"{argv[0]} failed: {exc}") from None
    if done.returncode != 0:
        raise RuntimeError(f"{argv[0]} {argv[1]} failed: {(done.stderr or done.stdout).strip()[:300]}")
    return done.stdout


def split_ref(code: str) -> tuple[str, str, str]:
    """(kind, path or reference, tag) of an image's ``code``: kind is ``layout``, ``archive`` or ``registry``."""
    for prefix, kind in (("oci-archive:", "archive"), ("oci:", "layout")):
        if code.startswith(prefix):
            code = code[len(prefix):]
            path, _, tag = code.partition(":")
            return kind, path, tag or "latest"
    if code.startswith(("/", "./", "../")):
        path, _, tag = code.partition(":")
        return ("archive" if Path(path).is_file() else "layout"), path, tag or "latest"
    name, _, tag = code.rpartition(":") if ":" in code.rsplit("/", 1)[-1] else (code, "", "latest")
    return "registry", name or code, tag


class ContainerRuntime(SupervisedRuntime):
    """Runs OCI containers with runc."""

    name = NAME
    virtualizations = ("container",)
    makes_cgroup = False  # runc creates the container's cgroup from the config

    def __init__(self, data_dir: str) -> None:
        super().__init__(data_dir)
        self.state = self.data_dir / "runc"
        self.images = self.data_dir / "images"
        self.bundles = self.data_dir / "bundles"

    @staticmethod
    def available() -> str | None:
        """None when runc and umoci are usable here, else why not."""
        if not shutil.which("runc") or not shutil.which("umoci"):
            return "the container runtime needs runc and umoci (apt-get install runc umoci)"
        return None

    def _cid(self, iid: str) -> str:
        return f"oak-{iid}"

    # ---- images ------------------------------------------------------------------------------

    def image_layout(self, code: str, log_file: Path) -> tuple[Path, str]:
        """A local OCI layout holding the image of *code*, pulling or extracting it if needed."""
        kind, where, tag = split_ref(code)
        if kind == "layout":
            if not (Path(where) / "index.json").exists():
                raise RuntimeError(f"{where} is not an OCI image layout (no index.json)")
            return Path(where), tag
        cache = self.images / hashlib.sha256(f"{kind}:{where}".encode()).hexdigest()[:16]
        if (cache / "index.json").exists():
            return cache, tag
        tmp = cache.with_name(f"{cache.name}.{uuid.uuid4().hex[:8]}.tmp")  # instances may start together
        tmp.mkdir(parents=True)
        if kind == "archive":
            try:
                with tarfile.open(where) as archive:
                    archive.extractall(tmp, filter="data")
            except (OSError, tarfile.TarError) as exc:
                raise RuntimeError(f"cannot read the OCI archive {where}: {exc}") from None
        else:
            if not shutil.which("skopeo"):
                raise RuntimeError(f"cannot pull {code}: pulling from a registry needs skopeo (apt-get install "
                                   "skopeo); or give a local OCI layout or archive path")
            with open(log_file, "a") as progress:
                progress.write(f"pulling {where}:{tag}\n")
            _run("skopeo", "copy", f"docker://{where}:{tag}", f"oci:{tmp}:{tag}")
        try:
            tmp.rename(cache)
        except OSError:  # another instance cached it first
            shutil.rmtree(tmp, ignore_errors=True)
        return cache, tag

    # ---- the supervised child ----------------------------------------------------------------

    def prepare(self, spec: LaunchSpec) -> None:
        """Unpack the image into a fresh bundle and write its runc config."""
        reason = self.available()
        if reason:
            raise RuntimeError(reason)
        cid = self._cid(spec.iid)
        self._forget(cid)
        bundle = self.bundles / spec.iid
        shutil.rmtree(bundle, ignore_errors=True)
        self.bundles.mkdir(parents=True, exist_ok=True)
        Path(spec.log_path).parent.mkdir(parents=True, exist_ok=True)
        layout, tag = self.image_layout(spec.code, Path(spec.log_path))
        _run("umoci", "unpack", "--image", f"{layout}:{tag}", str(bundle))
        config_path = bundle / "config.json"
        config = json.loads(config_path.read_text())
        config_path.write_text(json.dumps(self.configure(config, spec)))

    def configure(self, config: dict[str, Any], spec: LaunchSpec) -> dict[str, Any]:
        """Apply the SLA to the runtime config umoci derived from the image."""
        process = config.setdefault("process", {})
        process["terminal"] = False
        if spec.cmd:
            process["args"] = list(spec.cmd)
        if not process.get("args"):
            raise RuntimeError("the image has no command and the SLA gives no cmd")
        env = [e for e in process.get("env", []) if not e.startswith("HOSTNAME=")]
        process["env"] = [*env, f"HOSTNAME=instance-{spec.instance_number}", *spec.environment]
        config["hostname"] = f"instance-{spec.instance_number}"
        linux = config.setdefault("linux", {})
        linux["namespaces"] = [ns for ns in linux.get("namespaces", []) if ns.get("type") != "network"]
        if spec.netns:  # the instance's own namespace from the overlay; without it, the worker's
            linux["namespaces"].append({"type": "network", "path": spec.netns})
        linux["cgroupsPath"] = relative_path(spec.iid)
        resources = linux.setdefault("resources", {})
        if spec.memory_mb:
            resources["memory"] = {"limit": spec.memory_mb * 2**20, "swap": spec.memory_mb * 2**20}
        if spec.vcpus:
            resources["cpu"] = {"quota": max(1000, int(spec.vcpus * CPU_PERIOD_US)), "period": CPU_PERIOD_US}
        if spec.privileged:
            caps = process.setdefault("capabilities", {})
            for kind in ("bounding", "effective", "permitted", "inheritable", "ambient"):
                caps[kind] = list(ALL_CAPS)
            linux.pop("seccomp", None)
            linux["maskedPaths"], linux["readonlyPaths"] = [], []
        # Share the worker's /etc/resolv.conf and hosts so names resolve as on the worker.
        mounts = config.setdefault("mounts", [])
        for name in ("resolv.conf", "hosts"):
            if Path(f"/etc/{name}").exists():
                mounts.append({"destination": f"/etc/{name}", "type": "bind", "source": f"/etc/{name}",
                               "options": ["rbind", "ro"]})
        return config

    async def start(self, spec: LaunchSpec) -> Handle:
        """Start ``runc run`` and return once the container has really started (or already ended)."""
        handle = await super().start(spec)
        child = self._children.get(handle.pid)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_TIMEOUT
        while loop.time() < deadline and child is not None and child.returncode is None:
            if await asyncio.to_thread(self._status, spec.iid) in ("running", "stopped"):
                break
            await asyncio.sleep(0.005)
        return handle

    def _status(self, iid: str) -> str:
        try:
            return str(json.loads(_run("runc", "--root", str(self.state), "state", self._cid(iid)))["status"])
        except (RuntimeError, ValueError, KeyError):
            return ""

    def command(self, spec: LaunchSpec) -> list[str]:
        """``runc run --keep``: the container in the foreground, keeping its state for the exit report."""
        return ["runc", "--root", str(self.state), "run", "--keep", "--bundle", str(self.bundles / spec.iid),
                self._cid(spec.iid)]

    async def terminate(self, handle: Handle) -> None:
        """``runc kill TERM``."""
        self._kill_container(handle.iid, "TERM")

    async def kill(self, handle: Handle) -> None:
        """``runc kill KILL``."""
        self._kill_container(handle.iid, "KILL")

    def _kill_container(self, iid: str, sig: str) -> None:
        with contextlib.suppress(RuntimeError):
            _run("runc", "--root", str(self.state), "kill", self._cid(iid), sig)

    def _forget(self, cid: str) -> None:
        with contextlib.suppress(RuntimeError):
            _run("runc", "--root", str(self.state), "delete", "--force", cid)

    def cleanup(self, handle: Handle) -> None:
        """``runc delete`` (which removes the cgroup) and remove the bundle."""
        self._forget(self._cid(handle.iid))
        shutil.rmtree(self.bundles / handle.iid, ignore_errors=True)


@hookimpl
def oak_make_runtime(name: str, config: dict[str, Any]) -> ContainerRuntime | None:
    """Build the container runtime when asked for it by name."""
    if name != NAME:
        return None
    runtime = ContainerRuntime(data_dir=config["data_dir"])
    reason = runtime.available()
    if reason:
        raise ValueError(reason)
    return runtime
