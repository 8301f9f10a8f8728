"""The ``container`` runtime: OCI containers run by containerd or runc, from local OCI images or pulled ones.

Engine: containerd (driven by ``ctr``, see :mod:`plugins.runtimes.containerd`) when ``ctr`` and
``containerd`` are installed, else runc directly. ``OAK_CONTAINER_ENGINE=runc|containerd`` (or the
runtime config's ``engine``) forces one.

``code`` names the image:

* a local OCI image layout, ``/path/to/layout[:tag]`` (or ``oci:/path[:tag]``);
* a local OCI archive (a tar of a layout), ``/path/to/image.tar[:tag]`` (or ``oci-archive:...``);
* a registry reference such as ``docker.io/library/nginx:latest``, pulled with skopeo into the
  worker's image cache when skopeo is installed and the registry is reachable; skopeo's progress
  goes to the instance's log and its status reason (CREATING, ``pulling <reference>``).

With runc:

Each instance gets a bundle unpacked with umoci, a config with the SLA's ``cmd`` (replacing the
image's command), ``environment``, memory limit and CPU quota (in the cgroup ``oakling/<iid>``,
next to the process runtime's) and, with ``privileged``, every capability. ``runc run --keep`` is the
supervised child, so the exit status is the container's and its cgroup outlives it long enough to
tell an out-of-memory kill. Stopping is ``runc kill TERM``, then ``KILL`` after the grace period;
``runc delete`` and removing the bundle leave nothing behind. With the overlay the container joins
the instance's network namespace; without it, it shares the worker's.

Other OCI runtimes (:mod:`plugins.runtimes.oci`): a service whose virtualization names one (``runsc``,
``crun``) runs as with runc, by that runtime's ``run`` (whatever the engine), in a cgroup this runtime
makes itself and removes after reading the exit (they lack runc's ``--keep``).

With containerd: the layout is imported once per manifest digest, and ``ctr run -d`` starts the
container with its output appended to the instance's log by a logger containerd's shim runs (``--log-uri
binary://``, :data:`LOGGER`), the same cgroup (``oakling/<iid>``, ``--cgroup``) with ``--memory-limit`` and
``--cpu-quota``, ``--with-ns network:<the instance's or the worker's namespace>``, ``--env`` and
``--privileged``.
The handle is the task's init process; when it ends, the cgroup is read for an out-of-memory kill
before ``ctr task delete`` gives the exit code (so it is known even for a container that ended while
the worker was away) once the logger has written everything. Stopping is ``ctr task kill`` TERM, then
KILL; then the task, the container and its snapshot are deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import shutil
import subprocess
import tarfile
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import psutil

from plugins.runtimes import containerd, nvidia, oci
from plugins.runtimes.cgroups import CPU_PERIOD_US, absolute_path, relative_path
from plugins.runtimes.oci import OciRuntime
from plugins.runtimes.supervised import SupervisedRuntime, describe, open_log
from services.common.plugin_api import Exit, Handle, LaunchSpec, hookimpl
from services.common.private import private_opener, write_mode

log = logging.getLogger(__name__)
NAME = "container"
# containerd's shim, given a file:// log, copies the task's stdout and stderr into it with two copiers sharing
# the file, and the stdout copier closes it when its pipe ends (containerd 1.6's copyPipes): what stderr still
# held was lost, typically the last lines of a container that crashed (1 exit in ~15 under load).
# So the shim hands both pipes to this logger instead (``--log-uri binary://``): it appends each to the log
# until its end, and ``ctr task delete`` returns once it has (the shim waits for the logger to exit).
LOGGER = """#!/bin/sh
# Oakling's containerd logger: the shim passes the task's stdout on fd 3 and its stderr on fd 4, and waits
# for a byte on fd 5. Arguments: log PATH. It ends when both pipes have (the shim's TERM does not cut it short).
trap '' TERM
cat <&3 >>"$2" &
cat <&4 >>"$2" &
exec 3<&- 4<&-
printf . >&5
exec 5>&-
wait
"""
TOOL_TIMEOUT = 300
START_TIMEOUT = 30.0
ENGINE_ENV = "OAK_CONTAINER_ENGINE"
ENGINES = ("runc", "containerd")
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


def choose_engine(wanted: str = "") -> str:
    """The engine to use: *wanted* (or ``$OAK_CONTAINER_ENGINE``), or containerd when it is installed."""
    choice = (wanted or os.environ.get(ENGINE_ENV, "") or "auto").strip().lower()
    if choice not in ("auto", *ENGINES):
        raise ValueError(f"unknown container engine {choice!r} (use {', '.join(ENGINES)} or auto; "
                         f"set by {ENGINE_ENV} or the runtime's engine option)")
    if choice == "auto":
        return "containerd" if containerd.missing() is None else "runc"
    return choice


def pull(reference: str, destination: Path, log_file: Path, progress: Callable[[str], None] | None,
         authfile: str = "") -> None:
    """``skopeo copy`` *reference* into an OCI layout (logging in with *authfile*, a registry credential),
    its progress lines in the log and the status."""
    say = progress or (lambda _reason: None)
    say(f"pulling {reference}")
    with open(log_file, "a", opener=private_opener) as out:
        out.write(f"pulling {reference}\n")
        out.flush()
        try:
            login = ["--src-authfile", authfile] if authfile else []
            child = subprocess.Popen(["skopeo", "copy", *login, f"docker://{reference}", f"oci:{destination}:"
                                      f"{reference.rpartition(':')[2]}"], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        except OSError as exc:
            raise RuntimeError(f"cannot pull {reference}: {exc}") from None
        watchdog = threading.Timer(TOOL_TIMEOUT, child.kill)
        watchdog.start()
        last: list[str] = []
        try:
            assert child.stdout is not None
            for raw in child.stdout:
                line = raw.strip()
                if not line:
                    continue
                last = [*last[-2:], line]
                out.write(f"pull: {line}\n")
                out.flush()
                say(f"pulling {reference}: {line}"[:160])
            code = child.wait()
        finally:
            watchdog.cancel()
        if code != 0:
            out.write(f"pull of {reference} failed (skopeo exited with {code})\n")
            raise RuntimeError(f"cannot pull {reference}: {' / '.join(last)[:300] or f'skopeo exited with {code}'}")
        out.write(f"pulled {reference}\n")


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
    """Runs OCI containers with containerd or runc, and with every other OCI runtime in *oci*, by name."""

    name = NAME

    def __init__(self, data_dir: str, engine: str = "", owner: str = "",
                 oci: dict[str, OciRuntime] | None = None) -> None:
        super().__init__(data_dir, owner)
        self.engine = choose_engine(engine)
        self.oci = dict(oci or {})
        self.virtualizations = (NAME, *sorted(self.oci))
        self._runc = OciRuntime("runc", shutil.which("runc") or "runc")  # `container` with the runc engine
        self.state = self.data_dir / "runc"
        self.images = self.data_dir / "images"
        self.bundles = self.data_dir / "bundles"
        self.containerd = containerd.Containerd((self.data_dir / "containerd").absolute())

    @staticmethod
    def available() -> str | None:
        """None when runc and umoci are usable here, else why not."""
        if not shutil.which("runc") or not shutil.which("umoci"):
            return "the container runtime needs runc and umoci (apt-get install runc umoci)"
        return None

    def tool(self, virtualization: str) -> tuple[OciRuntime, Path]:
        """The OCI runtime running *virtualization*'s instances, and its state directory (``container`` and a
        handle without one: runc)."""
        chosen = self.oci.get(virtualization)
        if chosen is None:
            return self._runc, self.state
        return chosen, self.data_dir / "oci" / chosen.name

    def oci_argv(self, virtualization: str, *args: str, shares_host_network: bool = False) -> list[str]:
        """``<runtime> --root <state> [flags] args...`` for *virtualization*'s OCI runtime."""
        chosen, state = self.tool(virtualization)
        return [*chosen.argv(state, shares_host_network), *args]

    def makes_cgroup(self, virtualization: str) -> bool:
        """runc makes the container's group (directly or under containerd); for the others the worker does
        (see :data:`plugins.runtimes.oci.LEAVE_CGROUPS`)."""
        return not self.tool(virtualization)[0].is_runc

    def limits(self, spec: LaunchSpec) -> tuple[int, float]:
        """The SLA's limits, with room for the sandbox of a runtime that keeps one in the group (gVisor)."""
        room = self.tool(spec.virtualization)[0].sandbox_memory_mb if spec.memory_mb else 0
        return spec.memory_mb + room, spec.vcpus

    def remembered(self, spec: LaunchSpec) -> dict[str, Any]:
        """The OCI runtime the instance runs on, when it is not the default."""
        return {"oci": spec.virtualization} if spec.virtualization in self.oci else {}

    @staticmethod
    def _oci(handle: Handle) -> str:
        return str(handle.data.get("oci", ""))

    def unavailable(self) -> str | None:
        """None when this runtime's engine is usable here, else why not."""
        return containerd.missing() if self.engine == "containerd" else self.available()

    def facts(self) -> dict[str, str]:
        """The engine, as a node label (``container.engine=containerd``), each OCI runtime's binary
        (``oci.runsc=/usr/bin/runsc``), and ``oci.runsc.network=kernel`` where gVisor cannot use its own
        network stack (:func:`plugins.runtimes.oci.netstack_refused`)."""
        facts = {"container.engine": self.engine, **{f"oci.{n}": r.path for n, r in sorted(self.oci.items())}}
        facts |= {f"oci.{n}.network": "kernel" for n, r in self.oci.items() if r.kernel_network}
        return facts

    def _cid(self, iid: str) -> str:
        return f"oak-{iid}"

    @staticmethod
    def _on_containerd(handle: Handle) -> bool:
        return handle.data.get("engine") == "containerd"

    # ---- images ------------------------------------------------------------------------------

    def image_layout(self, code: str, log_file: Path, progress: Callable[[str], None] | None = None,
                     authfile: str = "") -> tuple[Path, str]:
        """A local OCI layout holding the image of *code*, pulling (with the credential in *authfile*) or
        extracting it if needed. An image pulled with a credential is cached apart, for that credential:
        nobody without it gets it from the cache."""
        kind, where, tag = split_ref(code)
        if kind == "layout":
            if not (Path(where) / "index.json").exists():
                raise RuntimeError(f"{where} is not an OCI image layout (no index.json)")
            return Path(where), tag
        login = hashlib.sha256(Path(authfile).read_bytes()).hexdigest() if authfile and kind == "registry" else ""
        cache = self.images / hashlib.sha256(f"{kind}:{where}:{login}".encode()).hexdigest()[:16]
        if (cache / "index.json").exists():
            return cache, tag
        tmp = cache.with_name(f"{cache.name}.{uuid.uuid4().hex[:8]}.tmp")  # instances may start together
        if kind == "registry" and not shutil.which("skopeo"):
            raise RuntimeError(f"cannot pull {code}: pulling from a registry needs skopeo (apt-get install "
                               "skopeo); or give a local OCI layout or archive path")
        tmp.mkdir(parents=True)
        try:
            if kind == "archive":
                try:
                    with tarfile.open(where) as archive:
                        archive.extractall(tmp, filter="data")
                except (OSError, tarfile.TarError) as exc:
                    raise RuntimeError(f"cannot read the OCI archive {where}: {exc}") from None
            else:
                pull(f"{where}:{tag}", tmp, log_file, progress, authfile)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        try:
            tmp.rename(cache)
        except OSError:  # another instance cached it first
            shutil.rmtree(tmp, ignore_errors=True)
        return cache, tag

    # ---- the supervised child ----------------------------------------------------------------

    def prepare(self, spec: LaunchSpec) -> None:
        """Unpack the image into a fresh bundle and write its runc config."""
        reason = self.available() if spec.virtualization == NAME else self._unusable(spec.virtualization)
        if reason:
            raise RuntimeError(reason)
        cid = self._cid(spec.iid)
        self._forget(cid, spec.virtualization)
        bundle = self.bundles / spec.iid
        shutil.rmtree(bundle, ignore_errors=True)
        self.bundles.mkdir(parents=True, exist_ok=True)
        Path(spec.log_path).parent.mkdir(parents=True, exist_ok=True)
        layout, tag = self.image_layout(spec.code, Path(spec.log_path), spec.on_progress, spec.registry_auth)
        _run("umoci", "unpack", "--image", f"{layout}:{tag}", str(bundle))
        config_path = bundle / "config.json"
        config = json.loads(config_path.read_text())
        if spec.secret_env:  # the config holds them: it lives on the instance's tmpfs, the bundle links to it
            kept = Path(spec.secret_dir) / "config.json"
            write_mode(kept, json.dumps(self.configure(config, spec)), 0o600)
            config_path.unlink()
            config_path.symlink_to(kept)
            return
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
        process["env"] = [*env, f"HOSTNAME=instance-{spec.instance_number}", *spec.environment, *spec.secret_env]
        config["hostname"] = f"instance-{spec.instance_number}"
        linux = config.setdefault("linux", {})
        linux["namespaces"] = [ns for ns in linux.get("namespaces", []) if ns.get("type") != "network"]
        if spec.netns:  # the instance's own namespace from the overlay; without it, the worker's
            linux["namespaces"].append({"type": "network", "path": spec.netns})
        if not self.makes_cgroup(spec.virtualization):  # else the worker's group holds the limits
            linux["cgroupsPath"] = relative_path(self.group(spec.iid))
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
        for source, target in _read_only(spec):
            mounts.append({"destination": target, "type": "bind", "source": source, "options": ["rbind", "ro"]})
        for source, target in spec.volumes:
            mounts.append({"destination": target, "type": "bind", "source": source, "options": ["rbind", "rw"]})
        if spec.gpus:
            method, edits = nvidia.edits_for(spec.gpus)
            nvidia.apply(config, edits)
            log.info("%s gets GPU(s) %s by %s", spec.iid, ",".join(str(d.index) for d in spec.gpus), method)
        return config

    async def start(self, spec: LaunchSpec) -> Handle:
        """Start ``runc run`` and return once the container has really started (or already ended)."""
        if self.engine == "containerd" and spec.virtualization == NAME:
            return await self._start_containerd(spec)
        handle = await super().start(spec)
        child = self._children.get(handle.pid)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_TIMEOUT
        while loop.time() < deadline and child is not None and child.returncode is None:
            if await asyncio.to_thread(self._status, spec.iid, spec.virtualization) in ("running", "stopped"):
                break
            await asyncio.sleep(0.005)
        return handle

    def _unusable(self, virtualization: str) -> str | None:
        """Why *virtualization*'s OCI runtime cannot run an image here, or None."""
        if not shutil.which("umoci"):
            return f"the {virtualization} runtime needs umoci to unpack images (apt-get install umoci)"
        chosen, _ = self.tool(virtualization)
        return None if shutil.which(chosen.path) else f"{chosen.path} ({virtualization}) is not installed any more"

    def _status(self, iid: str, virtualization: str) -> str:
        try:
            return str(json.loads(_run(*self.oci_argv(virtualization, "state", self._cid(iid))))["status"])
        except (RuntimeError, ValueError, KeyError):
            return ""

    def command(self, spec: LaunchSpec) -> list[str]:
        """``runc run --keep``: the container in the foreground, keeping its state for the exit report (the
        other OCI runtimes lack ``--keep``; the worker's cgroup keeps what they would lose)."""
        keep = ["--keep"] if not self.makes_cgroup(spec.virtualization) else []
        return self.oci_argv(spec.virtualization, "run", *keep, "--bundle", str(self.bundles / spec.iid),
                             self._cid(spec.iid), shares_host_network=not spec.netns)

    def exec_command(self, handle: Handle, argv: tuple[str, ...]) -> list[str]:
        """``runc exec`` (``ctr task exec``) of *argv* in the container."""
        cid = self._cid(handle.iid)
        if self._on_containerd(handle):
            self.containerd.ensure()
            return self.containerd.argv("task", "exec", "--exec-id", f"health-{uuid.uuid4().hex[:12]}", cid, *argv)
        return self.oci_argv(self._oci(handle), "exec", cid, *argv)

    async def terminate(self, handle: Handle) -> None:
        """``runc kill TERM`` (``ctr task kill -s SIGTERM``)."""
        await asyncio.to_thread(self._kill_container, handle, "TERM")

    async def kill(self, handle: Handle) -> None:
        """``runc kill KILL`` (``ctr task kill -s SIGKILL``)."""
        await asyncio.to_thread(self._kill_container, handle, "KILL")

    def _kill_container(self, handle: Handle, sig: str) -> None:
        with contextlib.suppress(RuntimeError):
            if self._on_containerd(handle):
                self.containerd.ensure()
                self.containerd.ctr("task", "kill", "--signal", f"SIG{sig}", self._cid(handle.iid))
            else:
                _run(*self.oci_argv(self._oci(handle), "kill", self._cid(handle.iid), sig))

    def _forget(self, cid: str, virtualization: str) -> None:
        with contextlib.suppress(RuntimeError):
            _run(*self.oci_argv(virtualization, "delete", "--force", cid))

    def cleanup(self, handle: Handle) -> None:
        """``runc delete`` (which removes the cgroup) and remove the bundle; with containerd, delete the
        task, the container and its snapshot."""
        if self._on_containerd(handle):
            with contextlib.suppress(RuntimeError):
                self.containerd.ensure()
                self.containerd.forget(self._cid(handle.iid))
            return
        self._forget(self._cid(handle.iid), self._oci(handle))
        shutil.rmtree(self.bundles / handle.iid, ignore_errors=True)

    async def adopt(self, handle: Handle) -> bool:
        """True when the container still runs; one that ended while the worker was away is removed."""
        if self._same(handle) is not None:
            return True
        await asyncio.to_thread(self._release, handle)
        return False

    async def close(self) -> None:
        """When the worker stops: stop the containerd it started (its instances are stopped by now)."""
        await super().close()
        if self.engine == "containerd":
            await asyncio.to_thread(self.containerd.stop)

    # ---- containerd ---------------------------------------------------------------------------

    def _ctr_run_args(self, spec: LaunchSpec, image: str, image_env: list[str]) -> list[str]:
        """``ctr run -d`` of *image* as the SLA says."""
        log_uri = f"binary://{quote(str(self._logger()))}?{urlencode({'log': str(Path(spec.log_path).resolve())})}"
        args = ["run", "-d", "--log-uri", log_uri,
                "--cgroup", absolute_path(self.group(spec.iid)) or relative_path(self.group(spec.iid))]
        if spec.memory_mb:
            args += ["--memory-limit", str(spec.memory_mb * 2**20)]
        if spec.vcpus:
            args += ["--cpu-quota", str(max(1000, int(spec.vcpus * CPU_PERIOD_US))), "--cpu-period", str(CPU_PERIOD_US)]
        if spec.privileged:
            args.append("--privileged")
        # The instance's own network namespace from the overlay; without it, the worker's (not
        # --net-host, which would also replace HOSTNAME with the worker's name).
        args += ["--with-ns", f"network:{spec.netns or f'/proc/{os.getpid()}/ns/net'}"]
        for source, target in _read_only(spec):
            args += ["--mount", f"type=bind,src={source},dst={target},options=rbind:ro"]
        for source, target in spec.volumes:
            args += ["--mount", f"type=bind,src={source},dst={target},options=rbind:rw"]
        env = [e for e in (*image_env, *spec.environment) if not e.startswith("HOSTNAME=")]
        if not any(e.startswith("PATH=") for e in env):
            args += ["--env", containerd.DEFAULT_PATH]
        for item in (f"HOSTNAME=instance-{spec.instance_number}", *spec.environment):
            args += ["--env", item]
        if spec.gpus:
            method, edits = nvidia.edits_for(spec.gpus)
            args += [arg for d in spec.gpus for arg in ("--gpus", str(d.index))] if method == "toolkit" \
                else nvidia.ctr_args(edits)
        if spec.secret_env:  # in a file on the instance's tmpfs: a command line is readable by anyone
            env_file = Path(spec.secret_dir) / ".env"
            write_mode(env_file, "".join(f"{item}\n" for item in spec.secret_env), 0o400)
            args += ["--env-file", str(env_file)]
        return [*args, image, self._cid(spec.iid), *spec.cmd]

    def _logger(self) -> Path:
        """The logger containerd's shim runs for each task (:data:`LOGGER`), written here if it is not yet."""
        path = (self.data_dir / "oak-logger").absolute()
        if not path.exists() or path.read_text() != LOGGER:
            path.parent.mkdir(parents=True, exist_ok=True)
            staged = path.with_name(f".oak-logger-{uuid.uuid4().hex}")
            staged.write_text(LOGGER)
            staged.chmod(0o700)
            staged.replace(path)  # a shim starting meanwhile runs the old one or the new one, never half of one
        return path

    def _prepare_containerd(self, spec: LaunchSpec) -> list[str]:
        layout, tag = self.image_layout(spec.code, Path(spec.log_path), spec.on_progress, spec.registry_auth)
        self.containerd.ensure()
        image, image_env = self.containerd.image(layout, tag)
        return self._ctr_run_args(spec, image, image_env)

    def _run_containerd(self, args: list[str], cid: str) -> int:
        try:
            try:
                self.containerd.run(*args)
            except RuntimeError as exc:
                if "already exists" not in str(exc):
                    raise
                self.containerd.forget(cid)  # left by an earlier start of this instance
                self.containerd.run(*args)
        except RuntimeError:
            self.containerd.forget(cid)
            raise
        return self.containerd.task_pid(cid)

    async def _start_containerd(self, spec: LaunchSpec) -> Handle:
        """``ctr run -d``: returns once the task has started; the handle is its init process."""
        with open_log(spec):
            pass  # directories made, log rotated; containerd's shim appends to it
        args = await asyncio.to_thread(self._prepare_containerd, spec)
        pid = await asyncio.to_thread(self._run_containerd, args, self._cid(spec.iid))
        try:
            started = psutil.Process(pid).create_time() if pid else 0.0
        except psutil.Error:
            started = 0.0  # already ended: wait() finds its exit code
        return Handle(spec.iid, self.name, pid, started,
                      {"memory_mb": spec.memory_mb, "engine": "containerd", "log": spec.log_path,
                       "cgroup": self.group(spec.iid)})

    async def wait(self, handle: Handle) -> Exit:
        """As the base for runc; with containerd, wait for the task's init process, then read the OOM
        count from its cgroup and its exit code from ``ctr task delete``."""
        if not self._on_containerd(handle):
            return await super().wait(handle)
        await self._gone(handle)
        self._probes.pop(handle.iid, None)
        usage = self.cgroup(handle).usage()

        def delete() -> int | None:
            self.containerd.ensure()
            return self.containerd.delete_task(self._cid(handle.iid))

        code = await asyncio.to_thread(delete)
        reason = describe(code) if code is not None else "ended (exit code unknown)"
        if usage is not None and usage.oom_kills:
            reason = f"out of memory: killed at its {handle.data.get('memory_mb', '?')} MB limit ({reason})"
        await asyncio.to_thread(self._release, handle)
        return Exit(code, reason)

    async def _gone(self, handle: Handle) -> None:
        """Return once the process behind *handle* has ended (a pidfd, else polling)."""
        try:
            fd = os.pidfd_open(handle.pid) if handle.pid > 0 else -1
        except OSError:
            fd = -1
        try:
            if fd >= 0 and self._same(handle) is not None:
                ended = asyncio.Event()
                loop = asyncio.get_running_loop()
                loop.add_reader(fd, ended.set)
                try:
                    await ended.wait()
                finally:
                    loop.remove_reader(fd)
            while self._same(handle) is not None:
                await asyncio.sleep(0.05)
        finally:
            if fd >= 0:
                os.close(fd)


def _read_only(spec: LaunchSpec) -> list[tuple[str, str]]:
    """What a container gets bind-mounted read-only: the worker's resolv.conf and hosts (names resolve as on
    the worker), and the instance's secret files."""
    shared = [(f"/etc/{name}", f"/etc/{name}") for name in ("resolv.conf", "hosts") if Path(f"/etc/{name}").exists()]
    return [*shared, *spec.secret_files]


@hookimpl
def oak_make_runtime(name: str, config: dict[str, Any]) -> ContainerRuntime | None:
    """Build the container runtime when asked for it by name."""
    if name != NAME:
        return None
    runtime = ContainerRuntime(data_dir=config["data_dir"], engine=str(config.get("engine", "")),
                               owner=str(config.get("node", "")), oci=oci.discover(config.get("oci_runtimes", ())))
    reason = runtime.unavailable()
    if reason:
        raise ValueError(reason)
    return runtime
