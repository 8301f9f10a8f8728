"""A wrong-password flood backs off and spares everyone else (issue 20), on the embedded broker and on
mosquitto (oak's login plugin), tried with mosquitto_sub as an attacker would; and the backoff's rules
on a clock of the test's own."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from broker.login_guard import FIRST_BACKOFF, FREE_FAILURES, MAX_BACKOFF, LoginGuard
from tests.conftest import Stack, either_broker, fleet
from tests.test_takeover import _connect

FLOOD = 40


@pytest.fixture(params=["embedded", "mosquitto"])
def stack(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stack]:
    """A stack on either broker."""
    yield from either_broker(request.param, tmp_path)


def _broker_log(stack: Stack) -> str:
    """The root's log, and mosquitto's when it runs one."""
    logs = [stack.base / "root.log", *(stack.base / "root").rglob("mosquitto.log")]
    return "".join(path.read_text(errors="replace") for path in logs if path.exists())


@pytest.mark.timeout(180)
async def test_a_password_flood_backs_off_and_spares_known_logins(stack: Stack, api: Any) -> None:
    """Wrong passwords for alice: after the free ones, her name and the flood's address are refused at once
    (even bob's right password from there), logged once; the password alice already used still logs her
    in, the admin's session is answered throughout, and bob gets in once the backoff is over."""
    admin = await fleet(stack, api, {})
    for user in ("alice", "bob"):
        await admin.request("users", "create", {"username": user, "password": f"{user}-password-1"})
    root, ca = stack.root_port, stack.base / "root" / "ca" / "ca.pem"
    alice, bob = ("alice", "alice-password-1"), ("bob", "bob-password-1")
    assert _connect(root, "alice-1", alice, ca) == 0

    for attempt in range(FLOOD):
        assert _connect(root, "alice-2", ("alice", f"wrong-{attempt}"), ca) != 0
        if attempt % 10 == 0:
            await admin.request("services", "list")  # the admin is answered throughout the flood
    assert _connect(root, "bob-1", bob, ca) != 0, "a right password from a source that is backing off"
    assert _connect(root, "alice-3", alice, ca) == 0, "a password that logged its user in before is never refused"
    assert _broker_log(stack).count(f"{FREE_FAILURES} failed logins for") == 1, "the flood is logged once"

    async def bob_in() -> bool:
        return _connect(root, "bob-1", bob, ca) == 0

    waited = 0.0
    while not await bob_in():  # the backoff of the flood's last hashed failure, at most MAX_BACKOFF
        assert waited < MAX_BACKOFF + 5, "bob never got in after the backoff"
        await asyncio.sleep(1)
        waited += 1


def test_the_backoff_rules() -> None:
    """Free failures, then a doubling backoff up to the maximum, per address and per name; a success clears
    both; refused attempts change nothing; a burst's note comes once."""
    now = [100.0]
    guard = LoginGuard(clock=lambda: now[0])
    notes = [guard.failed("10.0.0.1", "alice") for _ in range(FREE_FAILURES - 1)]
    assert notes == [""] * (FREE_FAILURES - 1)
    assert guard.refused_for("10.0.0.1", "alice") == 0
    assert "failed logins for address 10.0.0.1" in guard.failed("10.0.0.1", "alice")
    assert guard.refused_for("10.0.0.1", "alice") == FIRST_BACKOFF
    assert guard.refused_for("10.0.0.2", "alice") == FIRST_BACKOFF, "the name backs off from every address"
    assert guard.refused_for("10.0.0.1", "bob") == FIRST_BACKOFF, "the address backs off for every name"
    assert guard.refused_for("10.0.0.2", "bob") == 0
    assert guard.failed("10.0.0.1", "alice") == "", "noted once a burst"
    assert guard.refused_for("10.0.0.1", "alice") == 2 * FIRST_BACKOFF
    for _ in range(20):
        guard.failed("10.0.0.1", "alice")
    assert guard.refused_for("10.0.0.1", "alice") == MAX_BACKOFF
    now[0] += MAX_BACKOFF
    assert guard.refused_for("10.0.0.1", "alice") == 0
    guard.succeeded("10.0.0.1", "alice")
    assert guard.failed("10.0.0.1", "alice") == "", "a success starts the count again"
    assert guard.refused_for("10.0.0.1", "alice") == 0
