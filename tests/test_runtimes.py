"""The process and container runtimes on their own: limits enforced in cgroups, exit statuses,
out-of-memory kills, CPU throttling, namespaces, logs, adoption, and nothing left behind."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from plugins.runtimes import containerd, oci
from plugins.runtimes.cgroups import Cgroup, instances_cgroup2
from plugins.runtimes.container import ContainerRuntime, split_ref
from plugins.runtimes.oci import OciRuntime
from plugins.runtimes.process import ProcessRuntime
from plugins.runtimes.supervised import SupervisedRuntime, describe
from services.common.plugin_api import Exit, Handle, LaunchSpec

pytestmark = pytest.mark.timeout(60)
counter = iter(range(10_000))


def root_or_skip() -> None:
    if os.geteuid() != 0:
        pytest.skip("namespaces and cgroups need root")
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is not installed")


def containerd_or_skip() -> None:
    reason = containerd.missing()
    if reason:
        pytest.skip(reason)


def ctr_lists(rt: ContainerRuntime, what: str) -> list[str]:
    """``ctr <what> ls -q`` in the runtime's containerd."""
    return rt.containerd.run(what, "ls", "-q").split()


@pytest.fixture(params=["process", "container-runc", "container-containerd", "oci-crun", "oci-runsc"])
def runtime(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[SupervisedRuntime, str]]:
    """Each runtime (containers with each engine, and on crun and gVisor's runsc by name) with the code its
    instances run (the busybox image for containers); a private containerd is stopped at the end, leaving
    no process or mount."""
    root_or_skip()
    if request.param == "process":
        yield ProcessRuntime(str(tmp_path / "w")), ""
        return
    if request.param.startswith("oci-"):
        name = request.param.removeprefix("oci-")
        path = shutil.which(name)
        if path is None:
            pytest.skip(f"{name} is not installed (make test installs it when run as root)")
        yield ContainerRuntime(str(tmp_path / "w"), "runc", oci={name: OciRuntime(name, path)}), \
            str(request.getfixturevalue("busybox_image"))
        return
    engine = request.param.removeprefix("container-")
    if engine == "containerd":
        containerd_or_skip()
    image = request.getfixturevalue("busybox_image")
    rt = ContainerRuntime(str(tmp_path / "w"), engine=engine)
    yield rt, str(image)
    if engine == "containerd":
        recorded = rt.containerd._recorded()
        if rt.containerd.address:
            assert ctr_lists(rt, "task") == [], "no task left"
            assert ctr_lists(rt, "container") == [], "no container left"
        rt.containerd.stop()
        assert recorded is None or not psutil.pid_exists(recorded.pid), "the private containerd stopped"
        assert str(tmp_path) not in Path("/proc/self/mounts").read_text(), "no mount left"


def launch(tmp_path: Path, kind: str, code: str, cmd: list[str], memory: int = 0, vcpus: float = 0,
           env: tuple[str, ...] = ()) -> LaunchSpec:
    iid = f"t{os.getpid()}x{next(counter)}"
    return LaunchSpec(iid, "a.b.c.d", 3, kind, code, tuple(cmd), env, memory, vcpus, False,
                      str(tmp_path / "logs" / f"{iid}.log"), str(tmp_path / "work" / iid))


def kind_of(rt: SupervisedRuntime) -> str:
    """The virtualization the runtime under test serves (an OCI runtime's name, offered last)."""
    return rt.virtualizations[-1]


async def test_exit_codes_and_logs(runtime: tuple[SupervisedRuntime, str], tmp_path: Path) -> None:
    """Output lands in the log; the exit code and the environment come through."""
    rt, code = runtime
    spec = launch(tmp_path, kind_of(rt), code, ["sh", "-c", 'echo "out $GREETING $HOSTNAME"; echo err >&2; exit 3'],
                  env=("GREETING=hello",))
    end = await rt.wait(await rt.start(spec))
    assert (end.code, end.reason) == (3, "exited with code 3")
    assert sorted(Path(spec.log_path).read_text().splitlines()) == ["err", "out hello instance-3"]
    assert not Cgroup(spec.iid).exists()


@pytest.mark.parametrize("runtime", ["container-containerd"], indirect=True)
async def test_a_crashing_containers_last_lines_are_kept(runtime: tuple[SupervisedRuntime, str],
                                                        tmp_path: Path) -> None:
    """On containerd, a container's last stderr line, written as its stdout ends, reaches the log every time
    (containerd 1.6's own file logging lost it about one exit in fifteen under load: see container.LOGGER)."""
    rt, code = runtime
    for n in range(12):
        spec = launch(tmp_path, kind_of(rt), code, ["sh", "-c", f"echo out{n}; echo panic{n} >&2; exit 2"])
        end = await rt.wait(await rt.start(spec))
        assert end.code == 2
        lines = sorted(Path(spec.log_path).read_text().splitlines())  # complete once wait() returns
        assert lines == [f"out{n}", f"panic{n}"], f"exit {n}: the log holds {lines}"


async def test_memory_limit_kills_and_says_so(runtime: tuple[SupervisedRuntime, str], tmp_path: Path) -> None:
    """A process allocating past its memory limit is OOM-killed and the reason says out of memory."""
    rt, code = runtime
    spec = launch(tmp_path, kind_of(rt), code, ["dd", "if=/dev/zero", "of=/dev/null", "bs=200M", "count=1"],
                  memory=40)
    end = await rt.wait(await rt.start(spec))
    assert end.code != 0
    assert end.reason.startswith("out of memory: killed at its 40 MB limit")


async def test_cpu_quota_throttles(runtime: tuple[SupervisedRuntime, str], tmp_path: Path) -> None:
    """A busy loop limited to 0.2 vCPU uses about a fifth of a core and is throttled."""
    rt, code = runtime
    spec = launch(tmp_path, kind_of(rt), code, ["sh", "-c", "while :; do :; done"], vcpus=0.2)
    handle = await rt.start(spec)
    await asyncio.sleep(0.5)
    first = Cgroup(spec.iid).usage()
    await asyncio.sleep(2.0)
    second = Cgroup(spec.iid).usage()
    stats = await rt.stats(handle)
    await rt.stop(handle, 1.0)
    assert first is not None
    assert second is not None
    share = (second.cpu_seconds - first.cpu_seconds) / (second.at - first.at)
    assert 0.1 < share < 0.3, f"used {share:.2f} of a core with a 0.2 quota"
    assert second.throttled > 0, "the quota throttled it (on a busy machine it may not reach its quota in every period)"
    assert stats is not None
    assert stats.memory_mb > 0
    assert not Cgroup(spec.iid).exists()


async def test_own_pid_namespace(runtime: tuple[SupervisedRuntime, str], tmp_path: Path) -> None:
    """The instance sees only its own processes."""
    rt, code = runtime
    spec = launch(tmp_path, kind_of(rt), code, ["sh", "-c", "ls /proc | grep -c '^[0-9]'"])
    end = await rt.wait(await rt.start(spec))
    assert end.code == 0
    assert int(Path(spec.log_path).read_text().strip()) <= 4


async def test_exec_inside_the_instance(runtime: tuple[SupervisedRuntime, str], tmp_path: Path) -> None:
    """A command exec'd into a running instance (an exec health check) sees the instance's processes and
    files, comes back with its exit code and output, and is killed at its timeout."""
    rt, code = runtime
    mark = f"/tmp/oak-mark-{os.getpid()}-{tmp_path.name}"  # the process runtime shares the host's /tmp
    write = f"echo here > {mark}.$$ && mv {mark}.$$ {mark}-$HOSTNAME; sleep 300"
    spec = launch(tmp_path, kind_of(rt), code, ["sh", "-c", write])
    handle = await rt.start(spec)
    try:
        look = f"cat {mark}-instance-3 && ls /proc | grep -c '^[0-9]'"
        end = await eventually_exec(rt, handle, ("sh", "-c", look))
        words = end.reason.split(": ", 1)[1].split()
        assert len(words) == 2, f"expected the mark and a count: {end.reason!r}"
        here, processes = words
        assert (end.code, here) == (0, "here")
        assert int(processes) <= 6, "only the instance's processes (and the command's own)"
        assert (await rt.exec(handle, ("sh", "-c", "echo no; exit 4"), 5)) == Exit(4, "exited with code 4: no")
        late = await rt.exec(handle, ("sleep", "30"), 0.3)
        assert (late.code, late.reason) == (None, "did not end within 0.3 s")
    finally:
        await rt.stop(handle, 0.5)
        Path(f"{mark}-instance-3").unlink(missing_ok=True)


async def eventually_exec(rt: SupervisedRuntime, handle: Handle, argv: tuple[str, ...]) -> Exit:
    """*argv* exec'd once the instance has written its mark (it may not have yet; it appears whole, by a
    rename, so a command never reads it half written)."""
    for _ in range(50):
        end = await rt.exec(handle, argv, 5)
        if end.code == 0:
            return end
        await asyncio.sleep(0.1)
    return end


async def test_instance_joins_the_cgroup2_tree(runtime: tuple[SupervisedRuntime, str], tmp_path: Path) -> None:
    """Every runtime puts the instance in ``oakling/<iid>`` of the cgroup v2 tree (on a hybrid host too),
    where the worker's socket balancer sees its connections."""
    rt, code = runtime
    group = instances_cgroup2()
    if group is None:
        pytest.skip("no cgroup v2 hierarchy is mounted")
    spec = launch(tmp_path, kind_of(rt), code, ["sh", "-c", "sleep 300"])
    handle = await rt.start(spec)
    try:
        assert (group / spec.iid / "cgroup.procs").read_text().split(), "the instance's processes are there"
    finally:
        await rt.stop(handle, 0.5)
    assert not (group / spec.iid).exists(), "and the group goes with the instance"


async def test_stop_adopt_and_leave_nothing(runtime: tuple[SupervisedRuntime, str], tmp_path: Path) -> None:
    """A restarted worker adopts a running instance; stopping it (even one ignoring SIGTERM) leaves no
    process, cgroup, container or bundle."""
    rt, code = runtime
    spec = launch(tmp_path, kind_of(rt), code, ["sh", "-c", "trap '' TERM; sleep 300"])
    handle = await rt.start(spec)
    await asyncio.sleep(0.3)
    # the worker after a restart (a container runtime finds its private containerd again)
    again = ContainerRuntime(str(rt.data_dir), rt.engine, oci=rt.oci) if isinstance(rt, ContainerRuntime) \
        else type(rt)(str(rt.data_dir))
    assert await again.adopt(handle)
    await again.stop(handle, 0.5)
    assert not await again.adopt(handle)
    assert not Cgroup(spec.iid).exists()
    if isinstance(again, ContainerRuntime) and again.engine == "runc":
        listed = subprocess.run(again.oci_argv(kind_of(rt), "list"), capture_output=True, text=True)
        assert listed.returncode == 0, listed.stderr
        assert f"oak-{spec.iid}" not in listed.stdout, listed.stdout
        assert not (rt.bundles / spec.iid).exists()
    if isinstance(again, ContainerRuntime) and again.engine == "containerd":
        assert again.containerd.address == rt.containerd.address, "the same containerd, found again"
        assert ctr_lists(again, "task") == []
        assert ctr_lists(again, "container") == []


async def test_exit_zero_and_disk_io(runtime: tuple[SupervisedRuntime, str], tmp_path: Path) -> None:
    """Exit 0 (a one_shot's COMPLETED) comes through, and disk I/O shows in the instance's stats."""
    rt, code = runtime
    spec = launch(tmp_path, kind_of(rt), code, ["sh", "-c", "dd if=/dev/zero of=./io.bin bs=1M count=8 conv=fsync "
                                                "2>/dev/null; sleep 30"])
    handle = await rt.start(spec)
    stats = None
    for _ in range(100):
        stats = await rt.stats(handle)
        if stats is not None and stats.io_mb >= 8:
            break
        await asyncio.sleep(0.1)
    await rt.stop(handle, 0.5)
    assert stats is not None
    assert stats.io_mb >= 8, stats
    done = launch(tmp_path, kind_of(rt), code, ["true"])
    end = await rt.wait(await rt.start(done))
    assert (end.code, end.reason) == (0, "exited with code 0")


async def test_start_failures_are_readable(tmp_path: Path) -> None:
    """A missing program or a missing image fails with a reason people can act on."""
    root_or_skip()
    with pytest.raises(RuntimeError, match="No such file or directory: 'nope'"):
        await ProcessRuntime(str(tmp_path)).start(launch(tmp_path, "process", "", ["nope"]))
    if shutil.which("runc") and shutil.which("umoci"):
        with pytest.raises(RuntimeError, match="not an OCI image layout"):
            await ContainerRuntime(str(tmp_path), "runc").start(launch(tmp_path, "container", str(tmp_path),
                                                                       ["true"]))


async def test_containerd_start_failures(runtime: tuple[SupervisedRuntime, str], tmp_path: Path) -> None:
    """With containerd: a bad image path fails before containerd is needed, a missing program says
    so, and neither leaves a container behind (checked when the fixture ends)."""
    rt, code = runtime
    if not isinstance(rt, ContainerRuntime) or rt.engine != "containerd":
        pytest.skip("containerd only")
    with pytest.raises(RuntimeError, match="not an OCI image layout"):
        await rt.start(launch(tmp_path, "container", str(tmp_path), ["true"]))
    assert not rt.containerd.address, "no containerd started for an image that is not there"
    with pytest.raises(RuntimeError, match='exec: "nope": executable file not found'):
        await rt.start(launch(tmp_path, "container", code, ["nope"]))


@pytest.mark.parametrize(("code", "expected"), [
    ("/images/busybox.tar", ("layout", "/images/busybox.tar", "latest")),
    ("oci-archive:/x/b.tar:v1", ("archive", "/x/b.tar", "v1")),
    ("oci:/x/layout:edge", ("layout", "/x/layout", "edge")),
    ("docker.io/library/nginx:latest", ("registry", "docker.io/library/nginx", "latest")),
    ("localhost:5000/app", ("registry", "localhost:5000/app", "latest")),
    ("nginx", ("registry", "nginx", "latest")),
])
def test_image_references(code: str, expected: tuple[str, str, str]) -> None:
    """Image references: local layouts, archives and registry names, with their tags."""
    assert split_ref(code) == expected


def test_describe() -> None:
    """Return codes read as people say them."""
    assert describe(0) == "exited with code 0"
    assert describe(-9) == "killed by signal SIGKILL"
    assert describe(143) == "exited with code 143 (SIGTERM)"


@pytest.mark.parametrize("name", ["runsc", "crun"])
async def test_the_named_oci_runtime_runs_it(name: str, tmp_path: Path, busybox_image: Path) -> None:
    """``"virtualization": "runsc"`` runs under gVisor (its own kernel answers ``dmesg``), ``crun`` under crun
    (its state lists the container), from one container runtime that offers both beside ``container``."""
    root_or_skip()
    found = {n: OciRuntime(n, p) for n in ("runsc", "crun") if (p := shutil.which(n))}
    if name not in found:
        pytest.skip(f"{name} is not installed (make test installs it when run as root)")
    rt = ContainerRuntime(str(tmp_path / "w"), "runc", oci=found)
    assert set(rt.virtualizations) == {"container", *found}
    spec = launch(tmp_path, name, str(busybox_image), ["sh", "-c", "dmesg | head -3; echo up; sleep 300"])
    handle = await rt.start(spec)
    try:
        assert handle.data["oci"] == name
        listed = await asyncio.to_thread(subprocess.run, rt.oci_argv(name, "list"), capture_output=True, text=True)
        assert f"oak-{spec.iid}" in listed.stdout, "the container is the named runtime's"
        for _ in range(100):
            if "up" in Path(spec.log_path).read_text().split():
                break
            await asyncio.sleep(0.1)
        said = Path(spec.log_path).read_text()
        assert ("gVisor" in said) == (name == "runsc"), said
    finally:
        await rt.stop(handle, 0.5)


def test_oci_runtimes_are_discovered_and_given(tmp_path: Path) -> None:
    """On PATH, in containerd's config (a BinaryName, gVisor's shim type; Kata's shim is no OCI command), and
    ``--oci-runtime NAME=PATH [FLAGS]``, which wins; bad options say what is wrong."""
    config = tmp_path / "config.toml"
    config.write_text('''
version = 2
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.fast]
  runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.fast.options]
    BinaryName = "/bin/sh"
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.gvisor]
  runtime_type = "io.containerd.runsc.v1"
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.kata]
  runtime_type = "io.containerd.kata.v2"
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.nowhere.options]
  BinaryName = "/no/such/runtime"
''')
    found = oci.discover(["kvm=/bin/sh --platform=kvm"], config)
    assert found["fast"] == OciRuntime("fast", "/bin/sh")
    assert found["kvm"] == OciRuntime("kvm", "/bin/sh", ("--platform=kvm",))
    assert "kata" not in found
    assert "nowhere" not in found
    assert ("gvisor" in found) == (shutil.which("runsc") is not None)
    for name in ("runc", "crun", "runsc"):
        assert (name in found) == (shutil.which(name) is not None)
    for bad, says in [("runsc", "write NAME=PATH"), ("container=/bin/sh", "cannot name"),
                      ("Big=/bin/sh", "cannot name"), ("x=/no/such/binary", "not an executable")]:
        with pytest.raises(ValueError, match=says):
            oci.discover([bad], config)
    (tmp_path / "broken.toml").write_text("version = [")
    assert oci.from_containerd(tmp_path / "broken.toml") == []
    assert oci.from_containerd(tmp_path / "missing.toml") == []
    gvisor = OciRuntime("runsc", "/usr/bin/runsc")
    assert gvisor.argv(tmp_path, shares_host_network=True)[-2:] == ["--ignore-cgroups", "--network=host"]
    assert "--network=host" not in gvisor.argv(tmp_path)
