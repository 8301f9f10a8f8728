"""No leaks between tenants or on disk, and one rule for names.

* a user sees only its own services in every view, the workers' ``services`` counts included;
* a name with a control character (``"w1\\n"``) is refused when a worker joins and when a user is made;
* every file a tier writes is readable by its owner only.
"""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import pytest

from broker.join import obtain_login
from services.cli.client import ApiFailure, OakClient, Profile
from services.common import channels, envelope
from services.common.mqtt import BrokerUrl, MqttError
from tests.conftest import Stack, dumps, fleet, sla, sleeper
from tests.test_three_tiers import running


async def _infrastructure(client: OakClient) -> dict[str, Any]:
    topic = channels.API_INFRASTRUCTURE.topic(user=client.profile.username)
    await client.session.subscribe_confirmed(topic)
    while True:
        message = await client.updates.get()
        if message.topic == topic:
            return envelope.decode(message.payload).data  # type: ignore[no-any-return]


def _loose(base: Path) -> list[str]:
    """Files and directories under *base* that anyone but their owner may read (containerd's own tree,
    which containerd lays out itself, left aside)."""
    found = []
    for path in [base, *base.rglob("*")]:
        if "containerd" in path.parts or path.is_symlink():
            continue
        mode = path.stat().st_mode
        if (stat.S_ISDIR(mode) or stat.S_ISREG(mode)) and mode & 0o077:
            found.append(f"{path.relative_to(base.parent)} {stat.filemode(mode)}")
    return found


@pytest.mark.timeout(120)
async def test_tenants_see_only_their_own_and_files_are_private(stack: Stack, api: Any) -> None:
    """bob sees the workers but none of the admin's services on them; names with a newline are refused;
    the data dirs of root, cluster and worker hold nothing others may read."""
    admin = await fleet(stack, api, {"c1": ("w1",)})
    await admin.request("apps", "create", raw=dumps(sla(sleeper("job", 6061), app="priv")))
    await admin.request("services", "deploy", {"service": "priv.test.job.test", "replicas": 1})
    await running(admin, "priv.test.job.test", 1)
    await admin.request("users", "create", {"username": "bob", "password": "bob-password-1"})
    for bad in ("ok\n", "o\tk", "a/b", "a+b", "#", ""):
        with pytest.raises(ApiFailure) as err:
            await admin.request("users", "create", {"username": bad, "password": "long-enough"})
        assert err.value.code == "bad_request", bad

    bob = await OakClient(Profile("bob", "bob-password-1", admin.profile.root, admin.profile.ca)).__aenter__()
    try:
        assert [n["services"] for n in await bob.request("nodes", "list")] == [{}]
        assert [n["services"] for n in await admin.request("nodes", "list")] == [{"priv.test.job.test": 1}]
        seen = await _infrastructure(bob)
        assert [n["name"] for n in seen["nodes"]] == ["w1"]
        assert "priv" not in str(seen), "bob's infrastructure view names the admin's service"
    finally:
        await bob.__aexit__(None, None, None)

    cluster = BrokerUrl("127.0.0.1", stack.cluster_ports["c1"], tls=True)
    with pytest.raises(MqttError, match="bad name"):
        await obtain_login(stack.base / "w9", cluster, "node", "w9\n", None, timeout=10)
    assert not (stack.base / "w9" / "identity.json").exists()
    loose = [entry for name in ("root", "c1", "w1") for entry in _loose(stack.base / name)]
    assert not loose, f"readable by others: {loose}"
