"""Secrets: encrypted at the root, given to containers and processes as variables and read-only files,
and found nowhere else (no retained topic, no file the tiers write, no CLI output); a new value rolls
the services that use it."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest

from services.common.store import Store
from services.root.catalog import NotFound
from services.root.secrets import KEY_FILE, Secrets, key_at
from tests.conftest import Stack, dumps, eventually, machine_login, need_binary, online_nodes, sla
from tests.test_cli_and_scripts import run_oak

pytestmark = pytest.mark.timeout(240)
WORD = "S3cr3t-w0rd-7f1c9"  # the variable's value
KEY = b"-----BEGIN KEY-----\nline two, and a NUL \x00 byte\n-----END-----\n"  # the file's bytes
# What each instance prints: short digests of what it got, and whether the file can be written.
SHOW = ('echo "env=$(printf %s "$DB_PASS" | sha256sum | cut -c1-12) file=$(sha256sum < /run/secrets/tls.key | '
        'cut -c1-12) $( (echo x >> /run/secrets/tls.key) 2>/dev/null && echo writable || echo read-only)"; sleep 600')


def digest(value: bytes) -> str:
    return hashlib.sha256(value).hexdigest()[:12]


async def test_values_are_encrypted_at_rest(tmp_path: Path) -> None:
    """The root's store holds only ciphertext; the key is made once, 0600; another key cannot read them."""
    store = Store(tmp_path / "root.db.json")
    secrets = Secrets(store, key_at(tmp_path))
    first = await secrets.set("alice", "db-pass", WORD.encode())
    second = await secrets.set("alice", "db-pass", KEY)
    assert (first.version, second.version, second.size) == (1, 2, len(KEY))
    assert stat.S_IMODE(os.stat(tmp_path / KEY_FILE).st_mode) == 0o600
    store.close()
    again = Secrets(Store(tmp_path / "root.db.json"), key_at(tmp_path))
    await again.load()
    assert again.value("alice", "db-pass") == KEY
    on_disk = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name != KEY_FILE)
    assert WORD.encode() not in on_disk
    assert b"line two" not in on_disk
    assert [s.name for s in again.of("alice")] == ["db-pass"]
    assert again.of("bob") == []
    (tmp_path / "other").mkdir()
    stranger = Secrets(Store(tmp_path / "root.db.json"), key_at(tmp_path / "other"))
    await stranger.load()
    with pytest.raises(NotFound, match="cannot be decrypted"):
        stranger.value("alice", "db-pass")


def service(name: str, runtime: str, image: Path | None) -> dict[str, Any]:
    micro: dict[str, Any] = {"microservice_name": name, "cmd": ["sh", "-c", SHOW],
                             "secrets": [{"name": "db-pass", "env": "DB_PASS"},
                                         {"name": "tls-key", "file": "/run/secrets/tls.key"}]}
    if runtime == "container":
        micro.update(virtualization="container", code=str(image))
    return micro


async def logs_say(client: Any, job: str, word: bytes, key: bytes) -> bool:
    """Whether every instance of *job* printed the digests of *word* and *key*, and a read-only file."""
    state = await client.request("services", "inspect", {"service": job})
    if not state["instances"] or any(i["status"] != "RUNNING" for i in state["instances"]):
        return False
    for row in state["instances"]:
        path = stack_home[0] / row["node"] / "logs" / f"{row['iid']}.log"
        if f"env={digest(word)} file={digest(key)} read-only" not in path.read_text():
            return False
    return True


stack_home: list[Path] = []


async def test_secrets_reach_the_instance_and_nowhere_else(stack: Stack, api: Any, busybox_image: Path) -> None:
    """A container and a process get the variable and the read-only file; neither value is in any retained
    topic, any file of root, cluster or worker (but the instance's own tmpfs) or any CLI output; deploying
    before the secret exists is refused; a new value rolls both services; a used secret cannot be deleted."""
    need_binary("mosquitto_sub")
    stack_home[:] = [stack.base]
    stack.root()
    stack.cluster("c1")
    stack.worker("w1", "c1", "--runtime", "process", "--runtime", "container", "--stop-grace", "1")
    client = await api()
    await eventually(lambda: online_nodes(client, 1), 30, what="w1 online")
    home = stack.base / "root"
    outputs: list[str] = []

    async def oak(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run the CLI in a thread: this loop keeps the admin's connection alive meanwhile (blocked for as
        long as the CLI calls and the reads below take on a slow machine, its broker closed it)."""
        done = await asyncio.to_thread(run_oak, home, *args, check=check)
        outputs.extend((done.stdout, done.stderr))
        return done

    await oak("app", "create", str(_write(stack.base / "sla.json", dumps(sla(
        service("box", "container", busybox_image), service("proc", "process", None), app="sec")))))
    refused = await oak("service", "deploy", "sec.test.box.test", check=False)
    assert refused.returncode != 0
    assert "needs the secret(s) db-pass, tls-key" in refused.stderr
    await oak("secret", "set", "db-pass", "--value", WORD)
    await oak("secret", "set", "tls-key", "--from-file", str(_write(stack.base / "key.pem", KEY)))
    (stack.base / "key.pem").unlink()
    for job in ("sec.test.box.test", "sec.test.proc.test"):
        await oak("service", "deploy", job)
    for job in ("sec.test.box.test", "sec.test.proc.test"):
        await eventually(lambda job=job: logs_say(client, job, WORD.encode(), KEY), 60, interval=0.3,
                         what=f"{job} printing the digests of its secrets")
    listing = (await oak("secret", "list")).stdout
    assert "sec.test.box.test, sec.test.proc.test" in listing
    for args in (("service", "inspect", "sec.test.box.test"), ("service", "history", "sec.test.proc.test", "--json"),
                 ("service", "logs", "sec.test.box.test"), ("secret", "list", "--json")):
        await oak(*args)
    assert "used by" in (await oak("secret", "delete", "db-pass", check=False)).stderr

    retained = "".join(await asyncio.gather(
        asyncio.to_thread(_retained, stack, ["-t", "oak/api/admin/#"], stack.root_port, "root"),
        asyncio.to_thread(_retained, stack, ["-t", "oak/clusters/c1/#"], stack.root_port, "c1"),
        asyncio.to_thread(_retained, stack, ["-t", "oak/nodes/w1/#"], stack.cluster_ports["c1"], "w1")))
    assert "sec.test.box.test" in retained, "the retained topics were read"
    leaks = [WORD.encode(), b"line two", base64.b64encode(WORD.encode()), base64.b64encode(KEY)[:24]]
    assert not [leak for leak in leaks if leak in retained.encode()], "a secret in a retained topic"
    assert not [leak for leak in leaks if any(leak in out.encode() for out in outputs)], "a secret in CLI output"
    # Every file root, cluster and worker wrote (stores, logs, instance logs, bundles) but the instances'
    # own tmpfs and containerd's state: containerd keeps each container's spec, its variables included, in
    # its metadata (as it does under Kubernetes); secrets given as files are not there.
    tmpfs, containerd = stack.base / "w1" / "secrets", stack.base / "w1" / "containerd"

    def leaking_files() -> list[str]:
        files = [p for p in stack.base.rglob("*") if p.is_file() and not p.is_symlink()
                 and tmpfs not in p.parents and containerd not in p.parents]
        return [str(p) for p in files if any(leak in p.read_bytes() for leak in leaks)]

    found = await asyncio.to_thread(leaking_files)
    assert not found, f"a secret in files the tiers wrote: {found}"
    if os.geteuid() == 0:
        assert all(os.path.ismount(d) for d in tmpfs.iterdir()), "each instance's secrets are on a tmpfs"

    rolled = (await oak("secret", "set", "db-pass", "--value", "n3w-w0rd")).stdout
    assert "rolling sec.test.box.test, sec.test.proc.test" in rolled
    for job in ("sec.test.box.test", "sec.test.proc.test"):
        await eventually(lambda job=job: logs_say(client, job, b"n3w-w0rd", KEY), 60, interval=0.3,
                         what=f"{job} restarted with the new value")
    history = (await oak("service", "history", "sec.test.box.test")).stdout
    assert "secret db-pass" in history
    await client.request("apps", "delete", {"app": "sec"})
    await eventually(lambda: not any(tmpfs.iterdir()), 20, what="the instances' secret files gone")


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _retained(stack: Stack, filters: list[str], port: int, who: str) -> str:
    """Every retained message under *filters*, read as *who* (the admin, or a machine with its certificate)."""
    if who == "root":
        import json

        creds = json.loads((stack.base / "root" / "credentials.json").read_text())
        login = ["-V", "mqttv311", "-h", "127.0.0.1", "-p", str(port), "--cafile", creds["ca"], "-u",
                 creds["username"], "-P", creds["password"]]
    else:
        login = machine_login(stack, who, port)
    done = subprocess.run(["mosquitto_sub", *login, *filters, "--retained-only", "-W", "3", "-v"],
                          capture_output=True, timeout=20, check=False)
    return done.stdout.decode(errors="replace")
