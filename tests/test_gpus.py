"""NVIDIA GPUs: discovery from nvidia-smi, whole GPUs handed to instances, placement that never sums GPUs
across workers, and the container spec (CDI, the toolkit's hook, or device nodes and libraries).

This machine has no GPU. Discovery reads ``nvidia-smi --query-gpu`` output in the documented CSV form from a
stand-in script; device nodes are made with mknod in a temporary directory (a real runc container gets
them); :func:`test_a_real_gpu` runs where ``nvidia-smi`` lists a GPU and is skipped elsewhere, saying so."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest

from plugins.runtimes import nvidia
from plugins.runtimes.process import ProcessRuntime
from services.common.models import NodeSummary
from services.common.plugin_api import Demand, GpuDevice, LaunchSpec
from services.root.clusters import ClusterView, choose
from services.worker import gpus
from tests.conftest import dumps, eventually, sla
from tests.stack import Stack
from tests.test_root_placement import PROFILE
from tests.test_three_tiers import _online_nodes, running, state

RECORDED = """0, GPU-5a1c2f3e-8b7d-4e6f-9a0b-1c2d3e4f5a6b, NVIDIA A100-SXM4-40GB, 40960
1, GPU-6b2d3e4f-9c8e-4f70-8b1c-2d3e4f5a6b7c, NVIDIA A100-SXM4-40GB, 40960
"""
UUIDS = ("GPU-5a1c2f3e-8b7d-4e6f-9a0b-1c2d3e4f5a6b", "GPU-6b2d3e4f-9c8e-4f70-8b1c-2d3e4f5a6b7c")
LDCONFIG = """	libnvidia-ml.so.1 (libc6,x86-64) => /usr/lib/x86_64-linux-gnu/libnvidia-ml.so.1
	libcuda.so.1 (libc6,x86-64) => /usr/lib/x86_64-linux-gnu/libcuda.so.1
	libcuda.so.1 (libc6) => /usr/lib/i386-linux-gnu/libcuda.so.1
	libc.so.6 (libc6,x86-64) => /lib/x86_64-linux-gnu/libc.so.6
"""


def smi(tmp_path: Path, output: str = RECORDED, code: int = 0) -> Path:
    """A stand-in ``nvidia-smi`` printing *output* for the worker's query (and failing on any other)."""
    script = tmp_path / "nvidia-smi"
    (tmp_path / "smi-output").write_text(output)
    script.write_text(f"""#!/bin/sh
[ "$*" = "{' '.join(gpus.QUERY)}" ] || {{ echo "unexpected: $*" >&2; exit 9; }}
cat {tmp_path / 'smi-output'}
exit {code}
""")
    script.chmod(0o755)
    return script


def dev_nodes(where: Path) -> Path:
    """Device nodes like the driver's (major 195: nvidia0, nvidia1, nvidiactl at 255) in *where*."""
    where.mkdir(parents=True, exist_ok=True)
    for name, minor in (("nvidia0", 0), ("nvidia1", 1), ("nvidiactl", 255)):
        os.mknod(where / name, 0o666 | stat.S_IFCHR, os.makedev(195, minor))
    return where


def test_discovery_from_nvidia_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   caplog: pytest.LogCaptureFixture) -> None:
    """Index, UUID, model and memory of each GPU; nothing (and a warning) when nvidia-smi fails or says
    something else; nothing, quietly, without it."""
    monkeypatch.setenv(gpus.SMI_ENV, str(smi(tmp_path)))
    found = gpus.discover()
    assert [(g.index, g.uuid, g.memory_mb) for g in found] == [(0, UUIDS[0], 40960), (1, UUIDS[1], 40960)]
    assert gpus.summary(found) == (2, "NVIDIA A100-SXM4-40GB", 40960)
    mixed = gpus.parse(RECORDED + "2, GPU-77, NVIDIA T4, 15360\n")
    assert gpus.summary(mixed) == (3, "NVIDIA A100-SXM4-40GB + NVIDIA T4", 15360)
    monkeypatch.setenv(gpus.SMI_ENV, str(smi(tmp_path, "NVIDIA-SMI has failed because it couldn't communicate", 9)))
    assert gpus.discover() == []
    monkeypatch.setenv(gpus.SMI_ENV, str(smi(tmp_path, "0, not-a-uuid, X, 1")))
    assert gpus.discover() == []
    assert "cannot list the GPUs" in caplog.text
    monkeypatch.setenv(gpus.SMI_ENV, "")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert gpus.discover() == []


def test_whole_gpus_are_handed_out_once() -> None:
    """Lowest index first, never one held by another instance; too few free says how many there are."""
    found = gpus.parse(RECORDED)
    assert [g.index for g in gpus.assign(found, (), 1)] == [0]
    assert [g.index for g in gpus.assign(found, {UUIDS[0]}, 1)] == [1]
    with pytest.raises(RuntimeError, match=r"needs 2 GPU\(s\); this worker has 2, 1 free"):
        gpus.assign(found, {UUIDS[1]}, 2)


def gpu_cluster(name: str, *free: float) -> ClusterView:
    """A cluster whose workers have *free* GPUs each."""
    view = ClusterView(name)
    view.set_online(True)
    view.nodes = {f"{name}-{i}": NodeSummary(f"{name}-{i}", True, 4, 4096, 4, 4096, 0.0, ["container"], gpus_free=g,
                                             gpus=2) for i, g in enumerate(free)}
    return view


def test_the_root_never_sums_gpus_across_workers() -> None:
    """Two workers with one free GPU each cannot hold a two-GPU instance; a worker with two can."""
    split, whole = gpu_cluster("split", 1, 1), gpu_cluster("whole", 2)
    decision, worker = choose(Demand(1, 256, "container", gpus=2), [split, whole], {}, PROFILE)
    assert decision.choice is not None
    assert (decision.choice.id, worker) == ("whole", "whole-0")
    assert decision.reasons == {"split": "no worker fits (split-0: gpus 1 < 2; split-1: gpus 1 < 2)"}


def launch(tmp_path: Path, devices: tuple[GpuDevice, ...], kind: str = "container") -> LaunchSpec:
    return LaunchSpec("g1", "a.b.c.d", 0, kind, "", ("true",), (), 0, 0, False, str(tmp_path / "log"),
                      str(tmp_path / "work"), gpus=devices)


def test_container_spec_from_a_cdi_spec(tmp_path: Path) -> None:
    """A CDI spec (YAML, as nvidia-ctk writes it) gives its common edits and each chosen GPU's, by index or
    UUID; a GPU it lacks is a clear error."""
    nodes = dev_nodes(tmp_path / "dev")
    cdi = tmp_path / "cdi"
    cdi.mkdir()
    (cdi / "nvidia.yaml").write_text(f"""cdiVersion: 0.5.0
kind: nvidia.com/gpu
devices:
- name: "0"
  containerEdits:
    deviceNodes: [{{path: /dev/nvidia0, hostPath: {nodes / 'nvidia0'}}}]
- name: {UUIDS[1]}
  containerEdits:
    deviceNodes: [{{path: /dev/nvidia1, hostPath: {nodes / 'nvidia1'}}}]
containerEdits:
  env: [NVIDIA_VISIBLE_DEVICES=void]
  deviceNodes: [{{path: /dev/nvidiactl, hostPath: {nodes / 'nvidiactl'}}}]
  mounts: [{{hostPath: /usr/bin/true, containerPath: /usr/bin/nvidia-smi, options: [ro, nosuid, nodev, bind]}}]
  hooks: [{{hookName: createContainer, path: /usr/bin/nvidia-ctk, args: [nvidia-ctk, hook, update-ldcache]}}]
""")
    (cdi / "other.json").write_text(json.dumps({"cdiVersion": "0.5.0", "kind": "example.com/fpga", "devices": []}))
    specs = nvidia.cdi_specs([cdi, tmp_path / "absent"])
    assert len(specs) == 1
    config: dict[str, Any] = {}
    nvidia.apply(config, nvidia.from_cdi(specs, (GpuDevice(1, UUIDS[1]),)))
    assert [(d["path"], d["major"], d["minor"]) for d in config["linux"]["devices"]] == [
        ("/dev/nvidiactl", 195, 255), ("/dev/nvidia1", 195, 1)]
    assert {"allow": True, "type": "c", "major": 195, "minor": 1, "access": "rwm"} in \
        config["linux"]["resources"]["devices"]
    assert config["mounts"][0]["destination"] == "/usr/bin/nvidia-smi"
    assert config["hooks"]["createContainer"][0]["args"] == ["nvidia-ctk", "hook", "update-ldcache"]
    with pytest.raises(RuntimeError, match="GPU 5 .* is in no CDI spec"):
        nvidia.from_cdi(specs, (GpuDevice(5, "GPU-nope"),))


def test_container_spec_from_the_toolkit_or_the_device_nodes(tmp_path: Path) -> None:
    """The toolkit's hook is told the GPUs by UUID; without it, the GPUs' and control nodes, the 64-bit driver
    libraries and nvidia-smi; ctr gets the same as flags."""
    chosen = (GpuDevice(1, UUIDS[1]),)
    config: dict[str, Any] = {"process": {"env": ["PATH=/bin"]}}
    nvidia.apply(config, nvidia.from_toolkit("/usr/bin/nvidia-container-runtime-hook", chosen))
    assert config["hooks"]["prestart"] == [{"path": "/usr/bin/nvidia-container-runtime-hook",
                                            "args": ["nvidia-container-runtime-hook", "prestart"]}]
    assert f"NVIDIA_VISIBLE_DEVICES={UUIDS[1]}" in config["process"]["env"]
    libs = nvidia.libraries(LDCONFIG)
    assert libs == ["/usr/lib/x86_64-linux-gnu/libcuda.so.1", "/usr/lib/x86_64-linux-gnu/libnvidia-ml.so.1"]
    edits = nvidia.from_devices(chosen, dev_nodes(tmp_path / "dev"), libs, ["/usr/bin/nvidia-smi"])
    config = {}
    nvidia.apply(config, edits)
    assert [d["path"] for d in config["linux"]["devices"]] == ["/dev/nvidia1", "/dev/nvidiactl"]
    assert [m["destination"] for m in config["mounts"]] == [*libs, "/usr/bin/nvidia-smi"]
    assert f"CUDA_VISIBLE_DEVICES={UUIDS[1]}" in config["process"]["env"]
    flags = nvidia.ctr_args(edits)
    assert flags[flags.index("--device") + 1] == str(tmp_path / "dev" / "nvidia1")
    with pytest.raises(RuntimeError, match="no device node .*nvidia7"):
        nvidia.from_devices((GpuDevice(7, "GPU-x"),), tmp_path / "dev")


async def test_a_process_gets_cuda_visible_devices(tmp_path: Path) -> None:
    """The process runtime tells CUDA the instance's GPUs by UUID."""
    spec = launch(tmp_path, (GpuDevice(0, UUIDS[0]), GpuDevice(1, UUIDS[1])), "process")
    env = ProcessRuntime(str(tmp_path / "w")).environment(spec)
    assert env["CUDA_VISIBLE_DEVICES"] == f"{UUIDS[0]},{UUIDS[1]}"
    assert "CUDA_VISIBLE_DEVICES" not in ProcessRuntime(str(tmp_path / "w")).environment(launch(tmp_path, ()))


@pytest.mark.timeout(180)
async def test_gpus_through_the_stack(stack: Stack, api: Any, tmp_path: Path, busybox_image: Path) -> None:
    """A worker with two GPUs (nvidia-smi's answer recorded, device nodes made with mknod) reports them; two
    containers asking for one each get one each (its device node, nothing of the other's, its UUID), a
    third waits saying no worker has a free GPU, and the worker without GPUs never gets any of them."""
    if os.geteuid() != 0 or shutil.which("runc") is None:
        pytest.skip("containers need root and runc")
    stack.root()
    stack.cluster("c1")
    stack.worker("plain", "c1", "--runtime", "container", "--stop-grace", "1")
    stack.env = {gpus.SMI_ENV: str(smi(tmp_path)), nvidia.DEV_ENV: str(dev_nodes(tmp_path / "dev")),
                 "OAK_CONTAINER_ENGINE": "runc"}  # for the next worker only
    stack.worker("gpu", "c1", "--runtime", "container", "--stop-grace", "1")
    client = await api()
    await eventually(lambda: _online_nodes(client, 2), what="two workers")
    nodes = {n["name"]: n for n in await client.request("nodes", "list")}
    assert (nodes["gpu"]["gpus"], nodes["gpu"]["gpu_model"], nodes["plain"]["gpus"]) == (2, "NVIDIA A100-SXM4-40GB", 0)
    show = "ls -l /dev/ | grep nvidia; echo visible=$NVIDIA_VISIBLE_DEVICES; sleep 600"
    job = {"microservice_name": "cuda", "virtualization": "container", "code": str(busybox_image),
           "cmd": ["sh", "-c", show], "vgpus": 1}
    await client.request("apps", "create", raw=dumps(sla(job, app="gpu")))
    await client.request("services", "deploy", {"service": "gpu.test.cuda.test", "replicas": 2})
    both = (await running(client, "gpu.test.cuda.test", 2, "two GPU containers", timeout=60))["instances"]
    assert {i["node"] for i in both} == {"gpu"}
    seen = set()
    for instance in both:
        log = stack.base / "gpu" / "logs" / f"{instance['iid']}.log"
        lines = await eventually(lambda log=log: "visible=" in log.read_text() and log.read_text().splitlines(), 10)
        devices = sorted(line.split()[-1] for line in lines if "nvidia" in line and "visible" not in line)
        assert len(devices) == 2, lines
        assert "nvidiactl" in devices, lines
        own = next(d for d in devices if d != "nvidiactl")
        assert f"visible={UUIDS[int(own.removeprefix('nvidia'))]}" in lines, lines
        seen.add(own)
    assert seen == {"nvidia0", "nvidia1"}, "each its own GPU"
    await client.request("services", "deploy", {"service": "gpu.test.cuda.test", "replicas": 3})

    async def waits() -> str:
        left = [i for i in (await state(client, "gpu.test.cuda.test"))["instances"] if i["status"] != "RUNNING"]
        return str(left[0]["reason"]) if left and "gpus 0 < 1" in left[0]["reason"] else ""

    reason = await eventually(waits, 30, what="the third waiting for a GPU")
    assert "plain: gpus 0 < 1" in reason, reason
    await client.request("apps", "delete", {"app": "gpu"})


def test_a_real_gpu(tmp_path: Path) -> None:
    """Where nvidia-smi lists a GPU: the worker finds it, and a process given it sees it and only it."""
    if shutil.which("nvidia-smi") is None:
        pytest.skip("no NVIDIA GPU here (nvidia-smi is not installed); this test runs where there is one")
    found = gpus.discover()
    if not found:
        pytest.skip("nvidia-smi is installed but lists no GPU")
    first = found[0]
    env = nvidia.environment((first.device,))
    done = subprocess.run(["nvidia-smi", "-L"], env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=60, check=True)
    assert first.uuid in done.stdout
    edits = nvidia.edits_for((first.device,))[1]
    config: dict[str, Any] = {}
    nvidia.apply(config, edits)
    assert config["linux"].get("devices") or config.get("hooks"), "the container gets the GPU somehow"
