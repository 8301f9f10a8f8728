"""The test harness's own promises: tests running side by side never share a port."""

from __future__ import annotations

import pytest

from tests import stack
from tests.stack import PORTS, own_ports


def test_xdist_workers_take_disjoint_ports(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "2")
    shares = []
    for worker in ("gw0", "gw1"):
        monkeypatch.setenv("PYTEST_XDIST_WORKER", worker)
        shares.append(set(own_ports()))
    assert not shares[0] & shares[1]
    assert shares[0] | shares[1] == set(PORTS)


def test_a_port_is_handed_out_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ten ports among ten: each once, then none (a tier binds its port a second or more after it is chosen).
    The ten lie just above :data:`PORTS`, where no other test's tier listens."""
    ten = range(PORTS.stop, PORTS.stop + 30, 3)
    monkeypatch.setattr(stack, "own_ports", lambda: ten)
    monkeypatch.setattr(stack, "_handed_out", set())
    assert sorted(stack.free_port() for _ in ten) == list(ten)
    with pytest.raises(RuntimeError, match="no three free TCP ports"):
        stack.free_port()
