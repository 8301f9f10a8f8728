"""Every request the broker accepted gets exactly one answer, whatever its publisher does next (issue 20).

Tried as a script would: ``mosquitto_pub -l`` publishes 1,000 requests and exits at once. On the embedded
broker 460 of them used to vanish (amqtt stopped delivering what a client had sent the moment it left);
with a small ``--busy-backlog`` the root answers the excess ``busy`` with a retry hint instead of making
them wait. On both brokers. And a request that fails in an unforeseen way is answered ``internal``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from services.common import channels
from services.root.api import Api
from tests.conftest import Stack, answers_by_transaction, connect, need_binary, subscribed, untimed
from tests.fakes import FakeSession, deliver_on
from tests.stack import REPO, end, eventually

BURST = 1000


async def ask(api: Api, session: FakeSession, topic: str, payload: bytes) -> None:
    """One user request, through the API channel as the root's inbox hands it over."""
    await deliver_on(channels.API_REQUEST, lambda request: api.handle(session, request), session, topic, payload)  # type: ignore[arg-type]


@pytest.fixture(params=["embedded", "mosquitto"])
def broker(request: pytest.FixtureRequest) -> str:
    """Which broker the root runs; skips, saying why, when mosquitto or its clients are missing."""
    for binary in ("mosquitto_sub", "mosquitto_pub", *(("mosquitto",) if request.param == "mosquitto" else ())):
        need_binary(binary)
    return str(request.param)


@contextlib.contextmanager
def _stack(tmp_path: Path, broker: str, *extra: str) -> Iterator[Stack]:
    stack = Stack(tmp_path, root_args=(*(("--broker", "mosquitto") if broker == "mosquitto" else ()), *extra))
    try:
        yield stack
    finally:
        stack.stop()


async def _burst(stack: Stack, action: str = "services/list") -> dict[str, list[dict[str, Any]]]:
    """Publish BURST *action* requests with mosquitto_pub -l (QoS 1, exiting at once); their answers,
    by transaction, once every one is answered (or a minute has passed)."""
    stack.root()
    admin = await connect(stack)
    saved = json.loads((stack.base / "root" / "credentials.json").read_text())
    user = saved["username"]
    login = ["-V", "mqttv311", "-h", "127.0.0.1", "-p", str(stack.root_port), "--cafile", saved["ca"],
             "-u", user, "-P", saved["password"]]
    out = stack.base / "answers.txt"  # a file, not a pipe: a full pipe would stop mosquitto_sub reading
    answers = subscribed(["mosquitto_sub", *login, "-i", f"{user}-answers", "-q", "1",
                          "-t", f"oak/api/{user}/response/#"], out)
    try:
        requests = "".join(json.dumps({"transaction": str(n)}) + "\n" for n in range(BURST))
        subprocess.run(["mosquitto_pub", *login, "-i", f"{user}-burst", "-q", "1", "-l",
                        "-t", f"oak/api/{user}/request/{action}"], input=requests, text=True, check=True,
                       cwd=REPO, timeout=60)
        with contextlib.suppress(AssertionError):  # the caller's assertions say which are missing
            await eventually(lambda: len(_answered(out)) == BURST, 60, 0.1, what="every request answered")
        await admin.request("services", "list")  # the root is still serving
    finally:
        end(answers)
        await admin.__aexit__(None, None, None)
    return _answered(out)


def _answered(out: Path) -> dict[str, list[dict[str, Any]]]:
    """The answers mosquitto_sub wrote to *out* so far, by transaction (not the admin's own request)."""
    return {t: answers for t, answers in answers_by_transaction(out.read_text()).items() if t.isdigit()}


@pytest.mark.timeout(120)
async def test_a_burst_from_a_publisher_that_leaves_is_answered_in_full(broker: str, tmp_path: Path) -> None:
    """1,000 requests from mosquitto_pub -l: 1,000 answers, one per transaction, all ok."""
    with _stack(tmp_path, broker) as stack:
        answers = await _burst(stack)
    assert sorted(answers, key=int) == [str(n) for n in range(BURST)], f"{BURST - len(answers)} requests unanswered"
    assert all(len(a) == 1 and a[0]["ok"] for a in answers.values()), "one ok answer each"


@pytest.mark.timeout(120)
async def test_an_overloaded_root_answers_busy_instead_of_dropping(tmp_path: Path) -> None:
    """With --busy-backlog 20 the same burst gets one answer per request still: served, or busy with a
    retry hint in seconds; the root logs the overload once. (On mosquitto, which hands the root the
    burst faster than the root serves it; the embedded broker hands it over more slowly than that. With
    apps/list, which waits for the root's loop: the users' lane answers services/list on its own.)"""
    for binary in ("mosquitto", "mosquitto_sub", "mosquitto_pub"):
        need_binary(binary)
    with _stack(tmp_path, "mosquitto", "--busy-backlog", "20") as stack:
        answers = await _burst(stack, "apps/list")
        log = (stack.base / "root.log").read_text()
    assert sorted(answers, key=int) == [str(n) for n in range(BURST)], f"{BURST - len(answers)} requests unanswered"
    assert all(len(a) == 1 for a in answers.values()), "exactly one answer each"
    busy = [a[0]["error"] for a in answers.values() if not a[0]["ok"]]
    assert busy, "the backlog went past 20, so some were answered busy"
    assert {e["code"] for e in busy} == {"busy"}
    assert all(e["retry_after"] >= 1 and "retry in" in e["message"] for e in busy)
    assert len(busy) < BURST, "the root served what it could"
    assert log.count("answering requests busy until it catches up") == 1, "the overload is logged once"


class _Orchestrator:
    events = None  # no event feed: refused requests are only logged

    def flush_states(self) -> None:
        pass


async def test_a_request_waiting_behind_a_backlog_is_answered_busy_with_a_retry_hint() -> None:
    """Past the backlog limit a request is answered busy at once (retry_after: the backlog at the recent
    cost per request, at least 1 s), without being served; below it, it is served."""
    api = Api(None, _Orchestrator(), None, None, busy_backlog=10)  # type: ignore[arg-type]
    served = []

    async def fine(user: str, body: Any) -> Any:
        served.append(body["transaction"])
        return []

    api.routes[("services", "list")] = fine
    session = FakeSession()
    for backlog, transaction in ((11, "late"), (10, "on-time")):
        session.backlog = backlog
        await ask(api, session, "oak/api/alice/request/services/list",
                  json.dumps({"transaction": transaction}).encode())
    late, on_time = (json.loads(payload) for _, payload in session.published)
    assert late["error"]["code"] == "busy"
    assert late["error"]["retry_after"] >= 1.0
    assert late["transaction"] == "late"
    assert on_time["ok"]
    assert served == ["on-time"]


async def test_a_request_that_fails_unforeseen_is_answered_internal() -> None:
    """A handler's bug becomes an ``internal`` answer with the transaction, and the next request is served."""
    api = Api(None, _Orchestrator(), None, None)  # type: ignore[arg-type]

    async def broken(user: str, body: Any) -> Any:
        raise KeyError("a bug")

    async def fine(user: str, body: Any) -> Any:
        return ["ok"]

    api.routes[("apps", "list")] = broken
    api.routes[("services", "list")] = fine
    session = FakeSession()
    for verb in ("apps/list", "services/list"):
        await ask(api, session, f"oak/api/alice/request/{verb}", b'{"transaction": "t"}')
    (_, failed), (_, served) = session.published
    assert json.loads(failed)["error"]["code"] == "internal"
    assert json.loads(failed)["transaction"] == "t"
    assert untimed(json.loads(served)) == {"ok": True, "data": ["ok"], "transaction": "t"}


async def test_a_request_nested_too_deeply_is_answered_bad_request() -> None:
    """10,000 levels of nesting (json's recursion limit) get a bad_request answer, not silence."""
    api = Api(None, _Orchestrator(), None, None)  # type: ignore[arg-type]
    session = FakeSession()
    deep = b'{"transaction": "t", "x": ' + b"[" * 10_000 + b"]" * 10_000 + b"}"
    await ask(api, session, "oak/api/alice/request/services/list", deep)
    ((_, answer),) = session.published
    assert json.loads(answer)["error"] == {"code": "bad_request", "message": "the request is nested too deeply"}


async def test_one_users_slow_request_holds_up_only_her_own_later_ones() -> None:
    """Requests are served each user's in order and different users' side by side (issue 15): while
    alice's deploy waits, bob's list is answered; alice's next request is answered after her first."""
    api = Api(None, _Orchestrator(), None, None)  # type: ignore[arg-type]
    release = asyncio.Event()
    order: list[str] = []

    async def slow(user: str, body: Any) -> Any:
        await release.wait()
        order.append(f"{user} deploy")
        return "deployed"

    async def quick(user: str, body: Any) -> Any:
        order.append(f"{user} list")
        return []

    api.routes[("services", "deploy")] = slow
    api.routes[("services", "list")] = quick
    session = FakeSession()
    serving = asyncio.create_task(api.run())
    for topic in ("oak/api/alice/request/services/deploy", "oak/api/alice/request/services/list",
                  "oak/api/bob/request/services/list"):
        await deliver_on(channels.API_REQUEST, lambda request: api.take(session, request), session, topic,  # type: ignore[arg-type]
                         b"{}")
    await eventually(lambda: order == ["bob list"], 5, what="bob answered while alice's deploy waits")
    assert [t for t, _ in session.published] == ["oak/api/bob/response/services/list"]
    release.set()
    await eventually(lambda: len(session.published) == 3, 5, what="alice's two answers")
    assert order == ["bob list", "alice deploy", "alice list"]
    assert [t for t, _ in session.published][1:] == ["oak/api/alice/response/services/deploy",
                                                     "oak/api/alice/response/services/list"]
    serving.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await serving
