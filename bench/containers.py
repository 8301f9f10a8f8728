"""Submit-to-RUNNING with the container runtime (issue 3), against the engine driven by hand in the same run.

Orchestrated: ``services/deploy`` of a one-replica busybox container through root -> cluster ->
worker until the root's retained state says RUNNING, once with each engine: runc (bundle unpacked by
umoci, ``runc run``) and containerd (image imported once, ``ctr run -d``).
Baselines: the same image, ``umoci unpack`` + ``runc run -d`` of the bundle until ``runc state`` says
running; and ``ctr run -d`` of the imported image (a private containerd, as the worker's) until
``ctr task ls`` says RUNNING; both timed directly.

Run (as root, with runc and umoci; ctr and containerd for the containerd rows):
``.venv/bin/python -m bench.containers [--rounds N] [--engine runc|containerd|both]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import record, summary
from bench.three_tiers import _online, client_for, wait_status
from plugins.runtimes import containerd
from plugins.runtimes.oci import OciRuntime
from services.common import channels
from tests.images import build_busybox, missing
from tests.stack import Stack, eventually


def direct_oci(runtime: OciRuntime, image: Path, work: Path, rounds: int) -> list[float]:
    """Milliseconds for umoci unpack + ``<runtime> run -d`` (sharing this network) until its state says running."""
    state = work / "state"
    layout = work / "layout"
    layout.mkdir()
    subprocess.run(["tar", "-C", str(layout), "-xf", str(image)], check=True)
    out = []
    for i in range(rounds):
        bundle, cid = work / f"b{i}", f"bench-{i}"
        t0 = time.monotonic()
        subprocess.run(["umoci", "unpack", "--image", f"{layout}:latest", str(bundle)], check=True,
                       capture_output=True)
        config = json.loads((bundle / "config.json").read_text())
        config["process"]["terminal"] = False
        config["process"]["args"] = ["sleep", "60"]
        config["linux"]["namespaces"] = [n for n in config["linux"]["namespaces"] if n["type"] != "network"]
        (bundle / "config.json").write_text(json.dumps(config))
        # --detach hands the runtime's stdio to the container: no pipes, or this would wait for the container to end
        start = [*runtime.argv(state, shares_host_network=True), "run", "--detach", "--bundle", str(bundle), cid]
        quiet = subprocess.DEVNULL
        subprocess.run(start, check=True, stdin=quiet, stdout=quiet, stderr=quiet)
        while json.loads(subprocess.run([*runtime.argv(state), "state", cid], capture_output=True,
                                        text=True).stdout or "{}").get("status") != "running":
            time.sleep(0.001)
        out.append((time.monotonic() - t0) * 1000)
        subprocess.run([*runtime.argv(state), "delete", "--force", cid], capture_output=True)
        shutil.rmtree(bundle)
    return out


def task_status(daemon: containerd.Containerd, cid: str) -> str:
    """The status ``ctr task ls`` gives the task of *cid* ("" when it has none)."""
    for line in daemon.run("task", "ls").splitlines()[1:]:
        fields = line.split()
        if fields and fields[0] == cid:
            return fields[-1]
    return ""


def direct_ctr(image: Path, work: Path, rounds: int) -> list[float]:
    """Milliseconds for ``ctr run -d`` of the imported image until ``ctr task ls`` says RUNNING."""
    daemon = containerd.Containerd(work / "containerd", system_socket="/nonexistent")
    daemon.ensure()
    try:
        layout = work / "layout"
        layout.mkdir()
        subprocess.run(["tar", "-C", str(layout), "-xf", str(image)], check=True)
        ref, _ = daemon.image(layout, "latest")
        out = []
        for i in range(rounds):
            cid = f"bench-{i}"
            t0 = time.monotonic()
            daemon.run("run", "-d", "--net-host", "--env", containerd.DEFAULT_PATH, ref, cid, "sleep", "60")
            while task_status(daemon, cid) != "RUNNING":
                time.sleep(0.001)
            out.append((time.monotonic() - t0) * 1000)
            daemon.ctr("task", "kill", "--signal", "SIGKILL", cid)
            while task_status(daemon, cid) == "RUNNING":
                time.sleep(0.01)
            daemon.forget(cid)
        return out
    finally:
        daemon.stop()


async def orchestrated(micro: dict[str, Any], worker_args: tuple[str, ...], base: Path, rounds: int,
                       then: Callable[[Stack], float | None] | None = None) -> tuple[list[float], list[float]]:
    """Milliseconds from ``services/deploy`` of one replica of *micro* to RUNNING at the root, over *rounds*
    rounds after a first (which fills the worker's caches); and, with *then*, to the moment *then* (polled
    after RUNNING) returns a monotonic time."""
    stack = Stack(base)
    try:
        stack.root()
        stack.cluster("c1")
        stack.worker("w1", "c1", *worker_args, "--stop-grace", "0.2")
        client = await client_for(stack)
        await eventually(lambda: _online(client, 1), 30, what="worker online")
        doc = {"sla_version": "v2.0", "customerID": "bench", "applications": [{
            "applicationID": "", "application_name": "rt", "application_namespace": "bench", "application_desc": "",
            "microservices": [{"microserviceID": "", "microservice_name": "one", "microservice_namespace": "bench",
                               "memory": 32, "vcpus": 0.5, **micro}]}]}
        await client.request("apps", "create", raw=json.dumps(doc).encode())
        job = "rt.bench.one.bench"
        await client.session.subscribe_confirmed(
            channels.API_SERVICE_STATE.topic(user=client.profile.username, job=job))
        running, ready = [], []
        for _ in range(rounds + 1):
            t0 = time.monotonic()
            await client.request("services", "deploy", {"service": job, "replicas": 1})
            running.append((await wait_status(client, job, "RUNNING") - t0) * 1000)
            if then is not None:
                ready.append((await eventually(lambda: then(stack), 30, interval=0.001) - t0) * 1000)
            await client.request("services", "undeploy", {"service": job})
            await wait_status(client, job, "UNDEPLOYED")
            await asyncio.sleep(0.5)
        await client.__aexit__(None, None, None)
        return running[1:], ready[1:]
    finally:
        stack.stop()


async def with_engine(image: Path, base: Path, rounds: int, engine: str) -> list[float]:
    """Milliseconds from deploy to RUNNING at the root of a busybox container, with *engine*."""
    os.environ["OAK_CONTAINER_ENGINE"] = engine  # the worker inherits it
    micro = {"virtualization": "container", "code": str(image), "cmd": ["sleep", "60"], "vcpus": 0.1}
    running, _ = await orchestrated(micro, ("--runtime", "container"), base, rounds)
    return running


def compared(ours: list[float], name: str, baseline: list[float]) -> dict[str, Any]:
    """The orchestrated and *name*d baseline summaries of one run, their ratio and the milliseconds added."""
    mine, theirs = summary(ours), summary(baseline)
    return {"orchestrated": mine, name: theirs, "ratio_median": mine["median"] / theirs["median"],
            "added_median_ms": mine["median"] - theirs["median"]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--engine", choices=["runc", "containerd", "both"], default="both")
    args = p.parse_args()
    reason = missing()
    if reason:
        raise SystemExit(f"cannot run: {reason}")
    engines = ["runc", "containerd"] if args.engine == "both" else [args.engine]
    if "containerd" in engines and containerd.missing():
        if args.engine == "containerd":
            raise SystemExit(f"cannot run: {containerd.missing()}")
        engines.remove("containerd")
    result: dict[str, object] = {"command": f"python -m bench.containers --rounds {args.rounds} --engine {args.engine}",
                                 "unit": "ms", "goal": "orchestration adds under 100 ms at p50"}
    with tempfile.TemporaryDirectory() as tmp:
        image = build_busybox(Path(tmp) / "img")
        for engine in engines:
            ours = asyncio.run(with_engine(image, Path(tmp) / f"stack-{engine}", args.rounds, engine))
            direct = Path(tmp) / f"direct-{engine}"
            direct.mkdir()
            if engine == "runc":
                name, baseline = "direct_umoci_runc", direct_oci(OciRuntime("runc", "runc"), image, direct, args.rounds)
            else:
                name, baseline = "direct_ctr_run", direct_ctr(image, direct, args.rounds)
            result[engine] = compared(ours, name, baseline)
    record("container_submit_to_running", result)


if __name__ == "__main__":
    main()
