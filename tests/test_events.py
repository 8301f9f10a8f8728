"""Events: placements with the reasons candidates were refused, status changes, workers and clusters coming and
going, refused requests; followed with ``oak events [-f] [--service]`` and with mosquitto_sub."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import subprocess
from typing import Any

import pytest

from services.cli.client import ApiFailure
from services.cli.views import event_line
from tests.conftest import dumps, eventually, messages, sla, sleeper, subscribed
from tests.stack import REPO, Stack, oak
from tests.test_three_tiers import _online_nodes, running

pytestmark = pytest.mark.timeout(120)


def events(stack: Stack, *flags: str) -> list[str]:
    """``oak events FLAGS`` as the admin: its lines."""
    done = subprocess.run(oak("events", "--data-dir", str(stack.base / "root"), *flags), capture_output=True,
                          text=True, cwd=REPO, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_an_event_is_one_line() -> None:
    line = event_line({"at": 0, "kind": "unplaced", "what": "a.b.c.d #0: cannot be placed",
                       "reason": "c1: no worker fits (w1: memory 2048 < 99999)"})
    assert line.endswith("unplaced  a.b.c.d #0: cannot be placed  (c1: no worker fits (w1: memory 2048 < 99999))")


async def test_what_the_root_decided_and_saw(stack: Stack, api: Any) -> None:
    """Placements, a refusal with its reasons, status changes, the worker and the cluster online, a refused
    request; filtered by service; followed live as the worker goes; and the same on MQTT for scripts."""
    stack.root()
    stack.cluster("c1")
    stack.worker("w1", "c1", "--stop-grace", "1")
    client = await api()
    await eventually(lambda: _online_nodes(client, 1), what="the worker online")
    await client.request("apps", "create", raw=dumps(sla(sleeper("web"), sleeper("huge", memory=10**7), app="ev")))
    await client.request("services", "deploy", {"service": "ev.test.web.test", "replicas": 2})
    await client.request("services", "deploy", {"service": "ev.test.huge.test"})
    with pytest.raises(ApiFailure):
        await client.request("services", "deploy", {"service": "no.such.service.here"})
    await running(client, "ev.test.web.test", 2, "web")

    def seen() -> list[str] | None:
        lines = events(stack, "-n", "200")
        text = "\n".join(lines)
        wanted = ("ev.test.web.test #0: placed on cluster c1", "ev.test.web.test #1: placed on cluster c1",
                  "-> RUNNING", "ev.test.huge.test #0: cannot be placed  (", "worker w1 of cluster c1 is online",
                  "cluster c1 is online", "services/deploy refused")
        return lines if all(w in text for w in wanted) else None

    try:
        lines = await eventually(lambda: asyncio.to_thread(seen), 20, what="every kind of event")
    except AssertionError:
        raise AssertionError("\n".join(events(stack, "-n", "200"))) from None
    huge = next(line for line in lines if "huge" in line and "cannot be placed" in line)
    assert "memory" in huge, "the reasons candidates were refused"
    only = await asyncio.to_thread(events, stack, "--service", "ev.test.huge.test")
    assert only
    assert all("ev.test.huge.test" in line for line in only), only

    follower = await asyncio.create_subprocess_exec(
        *oak("events", "-f", "-n", "0", "--data-dir", str(stack.base / "root")), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, cwd=REPO)
    script = await asyncio.to_thread(
        subscribed, ["mosquitto_sub", *stack_login(stack), "-t", "oak/api/admin/events", "-C", "1", "-W", "30"])
    try:
        assert follower.stderr is not None
        said = b""
        async with asyncio.timeout(30):  # it says so on stderr once its subscription is confirmed
            while b"following new events" not in said:
                line = await follower.stderr.readline()
                assert line, f"oak events -f ended before it followed: {said.decode()}"
                said += line
        stack.procs["w1"].stop()
        got = ""

        async def told() -> bool:
            nonlocal got
            assert follower.stdout is not None
            with contextlib.suppress(TimeoutError):
                got += (await asyncio.wait_for(follower.stdout.readline(), 1)).decode()
            return re.search(r"worker w1 of cluster c1 is (offline|LOST)", got) is not None

        try:
            await eventually(told, 30, interval=0, what="the follower told the worker went")
        except AssertionError:
            follower.terminate()
            _, err = await follower.communicate()
            raise AssertionError(f"follower printed {got!r}; said {err.decode()[-2000:]}") from None
        [out] = await asyncio.to_thread(messages, script, 40)
        batch = json.loads(out)
        assert batch["kind"] == "events", "an envelope, like every state the root sends"
        assert batch["data"]["events"], batch
    finally:
        if follower.returncode is None:
            follower.terminate()
            await follower.wait()
        if script.poll() is None:
            script.terminate()
            script.wait()


def stack_login(stack: Stack) -> list[str]:
    """mosquitto_sub's flags for the admin at the stack's root (TLS, the root's CA)."""
    saved = json.loads((stack.base / "root" / "credentials.json").read_text())
    return ["-V", "mqttv311", "-h", "127.0.0.1", "-p", str(stack.root_port), "--cafile", saved["ca"], "-u",
            saved["username"], "-P", saved["password"]]
