"""containerd for the ``container`` runtime, driven through ``ctr``.

The system's containerd is used when its socket (``/run/containerd/containerd.sock``) answers
``ctr version``. Otherwise the worker runs a private one: ``containerd --config`` with root, state
and socket under ``<data dir>/containerd`` and the CRI plugin disabled.

The private containerd is started **detached** (its own session, its PID and start time recorded in
``containerd.pid``) and is **not** a casualty of the worker: after a ``kill -9`` the containers (whose
shims are containerd's children, not the worker's) keep running, and the restarted worker finds the
same containerd through the PID file and adopts them. A graceful stop of the worker stops its
instances first and then this containerd (``close``); if tasks are somehow still there it is left
running, so no container is orphaned. Everything lives in the ``oak`` namespace.

Images are imported from OCI layouts (``ctr image import`` of the layout as a tar stream), once per
manifest digest, under ``oak.local/<digest prefix>:<tag>``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import psutil

log = logging.getLogger(__name__)
SYSTEM_SOCKET = "/run/containerd/containerd.sock"
NAMESPACE = "oak"
TOOL_TIMEOUT = 300
BOOT_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
MAX_SOCKET = 104  # containerd refuses socket paths longer than this, its ".ttrpc" twin included
DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CONFIG = """version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.grpc.v1.cri"]

[grpc]
  address = "{socket}"

[ttrpc]
  address = "{socket}.ttrpc"
"""


def missing() -> str | None:
    """None when containerd can be used here (ctr, and containerd or a system containerd), else why not."""
    if shutil.which("ctr") is None:
        return "ctr is not installed (apt-get install containerd)"
    if shutil.which("containerd") is None and not Path(SYSTEM_SOCKET).exists():
        return "containerd is not installed (apt-get install containerd)"
    return None


class Containerd:
    """A containerd to talk to: the system's, or the worker's own in *home*."""

    def __init__(self, home: Path, system_socket: str = SYSTEM_SOCKET) -> None:
        self.home = home
        self.system_socket = system_socket
        self.address = ""
        self.private = False
        self._lock = threading.Lock()
        self._images: set[str] = set()
        self._image_locks: dict[str, threading.Lock] = {}
        self._child: subprocess.Popen[bytes] | None = None

    # ---- ctr ----------------------------------------------------------------------------------

    def argv(self, *args: str, address: str = "") -> list[str]:
        """The ``ctr`` command line for *args*, against this containerd and in the ``oak`` namespace."""
        return ["ctr", "-a", address or self.address, "-n", NAMESPACE, *args]

    def ctr(self, *args: str, stdin: int | None = None, timeout: float = TOOL_TIMEOUT,
            address: str = "") -> subprocess.CompletedProcess[str]:
        """Run ``ctr`` against this containerd, in the ``oak`` namespace."""
        argv = self.argv(*args, address=address)
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False,
                                  stdin=stdin if stdin is not None else subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise RuntimeError(f"ctr {args[0]} failed: {exc}") from None

    def run(self, *args: str, stdin: int | None = None) -> str:
        """``ctr`` that must succeed; raise RuntimeError with containerd's message when it does not."""
        done = self.ctr(*args, stdin=stdin)
        if done.returncode != 0:
            message = (done.stderr or done.stdout).strip().removeprefix("ctr: ")
            raise RuntimeError(f"containerd: {message[:400]}")
        return done.stdout

    def _answers(self, address: str) -> bool:
        try:
            return self.ctr("version", address=address, timeout=10).returncode == 0
        except RuntimeError:
            return False

    # ---- finding or starting containerd -------------------------------------------------------

    @property
    def socket(self) -> Path:
        """The private containerd's socket (under /run/oakling when the data dir's path is too long)."""
        sock = self.home / "containerd.sock"
        if len(f"{sock}.ttrpc") > MAX_SOCKET:
            digest = hashlib.sha256(str(self.home).encode()).hexdigest()[:12]
            sock = Path("/run/oakling") / f"containerd-{digest}.sock"
        return sock

    @property
    def pid_file(self) -> Path:
        return self.home / "containerd.pid"

    def _recorded(self) -> psutil.Process | None:
        """The private containerd recorded in the PID file, if it still runs."""
        try:
            data = json.loads(self.pid_file.read_text())
            proc = psutil.Process(int(data["pid"]))
            if abs(proc.create_time() - float(data["started"])) > 0.05 or proc.status() == psutil.STATUS_ZOMBIE:
                return None
            return proc
        except (OSError, ValueError, KeyError, TypeError, psutil.Error):
            return None

    def ensure(self) -> str:
        """The address of a containerd that answers: the system's, this worker's own (found again after
        a restart), or a private one started now."""
        with self._lock:
            if self.address and (not self.private or self._recorded() is not None):
                return self.address
            if Path(self.system_socket).exists() and self._answers(self.system_socket):
                self.address, self.private = self.system_socket, False
                log.info("containerd: using the system's at %s", self.address)
                return self.address
            if self._recorded() is not None and self._answers(str(self.socket)):
                self.address, self.private = str(self.socket), True
                log.info("containerd: using this worker's own at %s (still running)", self.address)
                return self.address
            self._start()
            return self.address

    def _start(self) -> None:
        if shutil.which("containerd") is None:
            raise RuntimeError("no containerd answers and containerd is not installed (apt-get install containerd)")
        sock = self.socket
        for path in (self.home / "root", self.home / "state", sock.parent):
            path.mkdir(parents=True, exist_ok=True)
        sock.unlink(missing_ok=True)
        config = self.home / "config.toml"
        config.write_text(CONFIG.format(root=self.home / "root", state=self.home / "state", socket=sock))
        with open(self.home / "containerd.log", "ab") as out:
            child = subprocess.Popen(["containerd", "--config", str(config)], stdin=subprocess.DEVNULL,
                                     stdout=out, stderr=out, start_new_session=True)
        self._child = child
        try:
            started = psutil.Process(child.pid).create_time()
        except psutil.Error:
            started = 0.0
        self.pid_file.write_text(json.dumps({"pid": child.pid, "started": started, "socket": str(sock)}))
        deadline = time.monotonic() + BOOT_TIMEOUT
        while time.monotonic() < deadline:
            if child.poll() is not None:
                raise RuntimeError(f"containerd exited at start (code {child.returncode}); see "
                                   f"{self.home / 'containerd.log'}")
            if sock.exists() and self._answers(str(sock)):
                self.address, self.private = str(sock), True
                log.info("containerd: started this worker's own (pid %d) at %s", child.pid, sock)
                return
            time.sleep(0.05)
        self._terminate(child.pid)
        raise RuntimeError(f"containerd did not answer within {BOOT_TIMEOUT:.0f} s; see {self.home / 'containerd.log'}")

    def stop(self) -> None:
        """Stop this worker's own containerd (not the system's), unless tasks still run in it."""
        with self._lock:
            proc = self._recorded()
            if proc is None:
                return
            if self.address:
                with contextlib.suppress(RuntimeError):
                    left = self.run("task", "ls", "-q").split()
                    if left:
                        log.warning("containerd: leaving it running, tasks remain: %s", ", ".join(left))
                        return
            self._terminate(proc.pid)
            self.pid_file.unlink(missing_ok=True)
            self.address = ""
            log.info("containerd: stopped this worker's own (pid %d)", proc.pid)

    def _terminate(self, pid: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        while time.monotonic() < deadline and psutil.pid_exists(pid):
            if self._child is not None and self._child.pid == pid and self._child.poll() is not None:
                break
            with contextlib.suppress(psutil.Error):
                if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                    break
            time.sleep(0.05)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self._child is not None and self._child.pid == pid:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._child.wait(5)
            self._child = None
        self.socket.unlink(missing_ok=True)
        Path(f"{self.socket}.ttrpc").unlink(missing_ok=True)

    # ---- images -------------------------------------------------------------------------------

    def image(self, layout: Path, tag: str) -> tuple[str, list[str]]:
        """Import the image *tag* of an OCI layout (once per manifest digest); return its containerd
        name and the environment its config sets."""
        manifest, config = read_image(layout, tag)
        base = f"oak.local/{manifest.removeprefix('sha256:')[:16]}"
        ref = f"{base}:{tag}"
        with self._lock:
            lock = self._image_locks.setdefault(ref, threading.Lock())
        with lock:
            if ref not in self._images and ref not in self.run("image", "ls", "-q").split():
                with subprocess.Popen(["tar", "-C", str(layout), "-cf", "-", "."], stdout=subprocess.PIPE) as tar:
                    try:
                        self.run("image", "import", "--base-name", base, "-", stdin=tar.stdout.fileno()
                                 if tar.stdout else None)
                    finally:
                        if tar.stdout:
                            tar.stdout.close()
                if ref not in self.run("image", "ls", "-q").split():
                    raise RuntimeError(f"importing {layout}:{tag} into containerd did not give {ref}")
            self._images.add(ref)
        return ref, list(config.get("config", {}).get("Env") or [])

    # ---- tasks --------------------------------------------------------------------------------

    def task_pid(self, cid: str) -> int:
        """The host PID of container *cid*'s task (0 when it has none)."""
        for line in self.run("task", "ls").splitlines()[1:]:
            fields = line.split()
            if len(fields) >= 2 and fields[0] == cid:
                return int(fields[1])
        return 0

    def delete_task(self, cid: str) -> int | None:
        """Delete the ended task of *cid*; return its exit code (None when it is unknown)."""
        done = self.ctr("task", "delete", cid)
        if done.returncode != 0:
            return None
        found = re.search(r"exit code (\d+)", done.stderr)
        return int(found.group(1)) if found else 0

    def forget(self, cid: str) -> None:
        """Remove container *cid*, its task and its snapshot, whatever state they are in."""
        with contextlib.suppress(RuntimeError):
            self.ctr("task", "delete", "--force", cid)
            self.ctr("container", "delete", cid)


def read_image(layout: Path, tag: str) -> tuple[str, dict[str, Any]]:
    """The manifest digest of *tag* in an OCI layout and the image's config."""
    def blob(digest: str) -> dict[str, Any]:
        algorithm, _, value = digest.partition(":")
        return dict(json.loads((layout / "blobs" / algorithm / value).read_text()))

    try:
        index = json.loads((layout / "index.json").read_text())
        manifests = index.get("manifests", [])
        chosen = [m for m in manifests if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag]
        if not chosen and len(manifests) == 1 and tag == "latest":
            chosen = manifests
        if not chosen:
            raise RuntimeError(f"{layout} has no image tagged {tag}")
        digest = str(chosen[0]["digest"])
        manifest = blob(digest)
        if "manifests" in manifest:  # an index: the linux entry for this machine's architecture
            arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine, os.uname().machine)
            entries = [m for m in manifest["manifests"] if isinstance(m, dict)  # type: ignore[union-attr]
                       and m.get("platform", {}).get("architecture") == arch]
            if not entries:
                raise RuntimeError(f"{layout}:{tag} has no image for {arch}")
            manifest = blob(str(entries[0]["digest"]))
        config = blob(str(manifest["config"]["digest"]))  # type: ignore[index]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RuntimeError(f"cannot read the image {tag} in {layout}: {exc}") from None
    return digest, config
