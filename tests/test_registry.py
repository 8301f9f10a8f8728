"""A private registry for real: Debian's docker-registry (the CNCF distribution registry) on a loopback port,
with TLS from a CA of the test's and htpasswd logins, the busybox image pushed with skopeo. A service whose
``registry_secret`` holds the login pulls and runs it through root, cluster and worker; without the secret
the registry refuses the pull and the instance's status says why."""

from __future__ import annotations

import shutil
import subprocess
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from broker.ca import Authority, cert_pem
from tests.conftest import dumps, eventually, sla
from tests.stack import Stack, end, free_port
from tests.test_three_tiers import _online_nodes, running

pytestmark = pytest.mark.timeout(180)
TOOLS = ("docker-registry", "skopeo", "htpasswd")
LOGIN = ("bob", "pa55 w0rd")


@dataclass(frozen=True)
class Registry:
    """A running registry: where the image is, the login it takes, and the CA that signed its certificate."""

    reference: str
    ca: Path


@pytest.fixture
def registry(tmp_path: Path, busybox_image: Path) -> Iterator[Registry]:
    """The registry, serving the busybox image as ``127.0.0.1:PORT/oak/busybox:1`` to *LOGIN* only."""
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (make test installs docker-registry, skopeo and "
                    "apache2-utils when run as root)")
    home = tmp_path / "registry"
    home.mkdir()
    authority = Authority.create("registry test CA")
    chain, key = authority.server_chain("registry", hosts=("127.0.0.1",))
    (home / "cert.pem").write_bytes(chain)
    (home / "key.pem").write_bytes(key)
    (home / "ca.pem").write_bytes(cert_pem(authority.cert))
    users = subprocess.run(["htpasswd", "-Bbn", *LOGIN], capture_output=True, text=True, check=True, timeout=30)
    (home / "htpasswd").write_text(users.stdout)
    port = free_port()
    (home / "config.yml").write_text(f"""version: 0.1
log: {{level: warn}}
storage: {{filesystem: {{rootdirectory: {home / 'data'}}}}}
http:
  addr: 127.0.0.1:{port}
  tls: {{certificate: {home / 'cert.pem'}, key: {home / 'key.pem'}}}
auth: {{htpasswd: {{realm: oak-test, path: {home / 'htpasswd'}}}}}
""")
    log = (home / "registry.log").open("wb")
    server = subprocess.Popen(["docker-registry", "serve", str(home / "config.yml")], stdout=log, stderr=log)
    log.close()
    try:
        layout = home / "layout"
        with tarfile.open(busybox_image) as tar:
            tar.extractall(layout, filter="tar")
        reference = f"127.0.0.1:{port}/oak/busybox:1"
        trusted = {"SSL_CERT_FILE": str(home / "ca.pem"), "PATH": "/usr/bin:/bin"}
        deadline = time.monotonic() + 30
        while True:  # the registry takes a moment to listen
            push = subprocess.run(["skopeo", "copy", "--dest-creds", ":".join(LOGIN), f"oci:{layout}:latest",
                                   f"docker://{reference}"], capture_output=True, text=True, env=trusted, timeout=60)
            if push.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert push.returncode == 0, push.stderr + (home / "registry.log").read_text()
        yield Registry(reference, home / "ca.pem")
    finally:
        end(server)


async def test_a_registry_secret_pulls_from_a_private_registry(registry: Registry, stack: Stack, api: Any) -> None:
    stack.root()
    stack.cluster("c1")
    stack.env = {**stack.env, "SSL_CERT_FILE": str(registry.ca)}  # the worker's skopeo trusts the registry's CA
    stack.worker("w1", "c1", "--runtime", "container", "--stop-grace", "1")
    client = await api()
    await eventually(lambda: _online_nodes(client, 1), 30, what="w1 online")
    box = {"virtualization": "container", "code": registry.reference, "cmd": ["sh", "-c", "echo pulled-and-ran; "
                                                                               "sleep 600"], "memory": 64}
    await client.request("apps", "create", raw=dumps(sla({"microservice_name": "anon", **box},
                                                         {"microservice_name": "priv", "registry_secret": "reg",
                                                          **box}, app="reg")))
    await client.request("secrets", "set", {"name": "reg", "value": ":".join(LOGIN)})
    await client.request("services", "deploy", {"service": "reg.test.anon.test"})
    await client.request("services", "deploy", {"service": "reg.test.priv.test"})

    async def refused() -> str:
        rows = (await client.request("services", "inspect", {"service": "reg.test.anon.test"}))["instances"]
        return next((r["reason"] for r in rows if "authentication required" in r["reason"]), "")

    reason = await eventually(refused, 60, what="the pull without a login refused, saying so")
    assert f"cannot pull {registry.reference}" in reason
    state = await running(client, "reg.test.priv.test", 1, "the private image pulled and RUNNING", timeout=90)
    log = stack.base / "w1" / "logs" / f"{state['instances'][0]['iid']}.log"
    await eventually(lambda: "pulled-and-ran" in log.read_text(), 30, what="the pulled image's command ran")
    assert LOGIN[1] not in log.read_text()
    assert LOGIN[1] not in (stack.base / "w1.log").read_text()
