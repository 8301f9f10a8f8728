"""Registry pulls through a fake ``skopeo`` on PATH (to make it slow, fail or record its calls): progress in the
instance's log and its status reason, the image cache, readable failures; and the container engine choice.
tests/test_registry.py pulls from a real private registry."""

from __future__ import annotations

import asyncio
import base64
import json
import os
from pathlib import Path

import pytest

from plugins.runtimes import container as container_module
from plugins.runtimes.container import ContainerRuntime, choose_engine
from services.common import models
from services.common.models import InstanceSpec
from services.common.sla import ServiceSpec
from services.common.store import Store
from services.worker.engine import Engine
from tests.conftest import eventually

# Writes an empty OCI layout to the destination (``oci:<dir>:<tag>``) like a pull would, saying what
# it copies; FAKE_SKOPEO_GATE makes it wait for a file first, FAKE_SKOPEO_FAIL makes it fail.
FAKE_SKOPEO = """#!/bin/sh
echo "Getting image source signatures"
if [ "$2" = "--src-authfile" ]; then cat "$3" > "$FAKE_SKOPEO_CALLS.auth"; fi
if [ -n "$FAKE_SKOPEO_GATE" ]; then while [ ! -e "$FAKE_SKOPEO_GATE" ]; do sleep 0.05; done; fi
if [ -n "$FAKE_SKOPEO_FAIL" ]; then echo "FATA[0000] pinging container registry: no such host" >&2; exit 1; fi
echo "Copying blob sha256:a2abf6c4d29d done"
echo "Copying config sha256:605c77e624dd done"
echo "Writing manifest to image destination"
echo "$@" >> "$FAKE_SKOPEO_CALLS"
for last; do :; done
dest=${last#oci:}; dir=${dest%:*}; tag=${dest##*:}
mkdir -p "$dir/blobs/sha256"
echo '{"imageLayoutVersion": "1.0.0"}' > "$dir/oci-layout"
printf '{"schemaVersion":2,"manifests":[{"annotations":{"org.opencontainers.image.ref.name":"%s"}}]}' "$tag" \
  > "$dir/index.json"
"""


@pytest.fixture
def skopeo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fake skopeo first on PATH; returns the file where it records its calls."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "skopeo"
    script.write_text(FAKE_SKOPEO)
    script.chmod(0o755)
    calls = tmp_path / "skopeo-calls"
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SKOPEO_CALLS", str(calls))
    return calls


def test_pull_progress_in_log_and_status(tmp_path: Path, skopeo: Path) -> None:
    """Each line skopeo prints goes to the instance's log and to the status reason; the pulled image
    is cached, so the second instance does not pull again."""
    rt = ContainerRuntime(str(tmp_path / "w"), engine="runc")
    log = tmp_path / "i.log"
    reasons: list[str] = []
    layout, tag = rt.image_layout("docker.io/library/nginx:latest", log, reasons.append)
    assert tag == "latest"
    assert json.loads((layout / "index.json").read_text())["manifests"]
    args = skopeo.read_text().split()
    assert args[:2] == ["copy", "docker://docker.io/library/nginx:latest"]
    assert args[2].startswith(f"oci:{rt.images}/")
    assert args[2].endswith(":latest")
    assert reasons[0] == "pulling docker.io/library/nginx:latest"
    assert "pulling docker.io/library/nginx:latest: Copying blob sha256:a2abf6c4d29d done" in reasons
    lines = log.read_text().splitlines()
    assert lines[0] == "pulling docker.io/library/nginx:latest"
    assert "pull: Copying config sha256:605c77e624dd done" in lines
    assert lines[-1] == "pulled docker.io/library/nginx:latest"
    again: list[str] = []
    assert rt.image_layout("docker.io/library/nginx:latest", log, again.append) == (layout, tag)
    assert again == []
    assert len(skopeo.read_text().splitlines()) == 1


def test_pull_failure_is_readable_and_leaves_nothing(tmp_path: Path, skopeo: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed pull says what skopeo said, in the error and in the log, and leaves no half image."""
    monkeypatch.setenv("FAKE_SKOPEO_FAIL", "1")
    rt = ContainerRuntime(str(tmp_path / "w"), engine="runc")
    log = tmp_path / "i.log"
    with pytest.raises(RuntimeError, match="cannot pull registry.example/app:v2: .*no such host"):
        rt.image_layout("registry.example/app:v2", log)
    assert "pull: FATA[0000] pinging container registry: no such host" in log.read_text()
    assert list(rt.images.iterdir()) == []


async def test_pulling_shows_in_the_instance_status(tmp_path: Path, skopeo: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """While the image is pulled the instance is CREATING with "pulling <reference>" as its reason."""
    gate = tmp_path / "gate"
    monkeypatch.setenv("FAKE_SKOPEO_GATE", str(gate))
    monkeypatch.setenv("FAKE_SKOPEO_FAIL", "1")  # then fail, so no runc is needed after the pull
    monkeypatch.setattr(ContainerRuntime, "available", staticmethod(lambda: None))
    rt = ContainerRuntime(str(tmp_path / "w"), engine="runc")
    service = ServiceSpec(app_name="a", app_namespace="n", name="s", namespace="n", virtualization="container",
                          code="docker.io/library/nginx:latest", cmd=())
    eng = Engine("w1", {"container": rt}, Store(tmp_path / "w.json"), tmp_path / "w")
    await eng.apply({"i1": InstanceSpec("i1", "admin", service.job_name, 0, service)})
    try:
        await eventually(lambda: eng.statuses()["i1"].reason.startswith("pulling docker.io/library/nginx:latest"),
                         what="pulling in the status")
        assert eng.statuses()["i1"].status == models.CREATING
        gate.touch()
        await eventually(lambda: eng.statuses()["i1"].status == models.FAILED, what="the pull failed")
        assert "no such host" in eng.statuses()["i1"].reason
        assert "pull: Getting image source signatures" in (tmp_path / "w" / "logs" / "i1.log").read_text()
    finally:
        gate.touch()
        await eng.apply({})
        await eventually(lambda: not eng.slots, what="removed")
        await asyncio.sleep(0.1)


async def test_registry_secret_logs_the_pull_in(tmp_path: Path, skopeo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A service with a registry_secret: its value (user:password, fetched as the instance starts) reaches
    skopeo as an auth file for the image's registry, on the instance's private directory only, gone with
    the instance; an image pulled with a credential is not served from the cache to a pull without it."""
    monkeypatch.setenv("FAKE_SKOPEO_FAIL", "1")  # after the login is seen: no runc needed
    monkeypatch.setattr(ContainerRuntime, "available", staticmethod(lambda: None))
    rt = ContainerRuntime(str(tmp_path / "w"), engine="runc")
    service = ServiceSpec(app_name="a", app_namespace="n", name="s", namespace="n", virtualization="container",
                          code="registry.example:5000/team/app:v1", registry_secret="reg")
    asked: list[str] = []

    async def fetch(iid: str) -> dict[str, bytes]:
        asked.append(iid)
        return {"reg": b"bob:pa55"}

    eng = Engine("w1", {"container": rt}, Store(tmp_path / "w.json"), tmp_path / "w", secrets=fetch)
    await eng.apply({"i1": InstanceSpec("i1", "admin", service.job_name, 0, service)})
    try:
        await eventually(lambda: eng.statuses()["i1"].status == models.FAILED, what="the pull failed")
        assert asked[0] == "i1"
        auth = json.loads(Path(f"{skopeo}.auth").read_text())
        assert auth == {"auths": {"registry.example:5000": {"auth": base64.b64encode(b"bob:pa55").decode()}}}
        assert "pa55" not in (tmp_path / "w" / "logs" / "i1.log").read_text()
    finally:
        await eng.apply({})
        await eventually(lambda: not eng.slots, what="removed")
        await asyncio.sleep(0.2)
    assert not (tmp_path / "w" / "secrets" / "i1").exists(), "the credential went with the instance"
    monkeypatch.delenv("FAKE_SKOPEO_FAIL")
    authfile = tmp_path / "auth.json"
    authfile.write_text("{}")
    with_login = rt.image_layout("registry.example/app:v2", tmp_path / "l.log", authfile=str(authfile))
    assert rt.image_layout("registry.example/app:v2", tmp_path / "l.log") != with_login


def test_engine_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    """containerd when it is installed, unless OAK_CONTAINER_ENGINE (or the runtime option) says otherwise."""
    monkeypatch.delenv("OAK_CONTAINER_ENGINE", raising=False)
    monkeypatch.setattr(container_module.containerd, "missing", lambda: None)
    assert choose_engine() == "containerd"
    monkeypatch.setattr(container_module.containerd, "missing", lambda: "ctr is not installed")
    assert choose_engine() == "runc"
    monkeypatch.setenv("OAK_CONTAINER_ENGINE", "containerd")
    assert choose_engine() == "containerd"
    assert choose_engine("runc") == "runc"
    monkeypatch.setenv("OAK_CONTAINER_ENGINE", "docker")
    with pytest.raises(ValueError, match="unknown container engine 'docker'"):
        choose_engine()
