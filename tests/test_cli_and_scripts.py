"""What people type: `oak up` and the `oak` CLI, the seed's NodeEngine/NetManager, and mosquitto scripts."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.common.envelope import decode
from services.worker.kernel import overlay_unavailable
from tests.conftest import messages, need_binary, sla, sleeper, subscribed, untimed
from tests.netlab import Lab
from tests.stack import REPO, Proc, Stack, free_port, oak

pytestmark = pytest.mark.timeout(120)


def run_oak(home: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``oak ARGS`` against the stack in *home*; fail with its stderr when it fails unexpectedly."""
    done = subprocess.run(oak(*args, "--data-dir", str(home)), capture_output=True, text=True, cwd=REPO,
                          timeout=60)
    if check and done.returncode != 0:
        raise AssertionError(f"oak {' '.join(args)} failed ({done.returncode}): {done.stderr}")
    return done


def wait_until(check, timeout: float = 30.0, what: str = "condition"):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def up(tmp_path: Path):  # type: ignore[no-untyped-def]
    """`oak up` (1-DOC in one process) on free ports, stopped at the end."""
    proc = Proc("up", oak("up", "--data-dir", str(tmp_path), "--host", "127.0.0.1", "--port", str(free_port()),
                          "--cluster-port", str(free_port()), "--name", "solo"), tmp_path).start()
    try:
        wait_until(lambda: (tmp_path / "credentials.json").exists(), what="credentials")
        wait_until(lambda: "solo" in run_oak(tmp_path, "node", "list", check=False).stdout, what="worker listed")
        yield tmp_path
    finally:
        proc.stop()


def test_oak_up_and_the_cli(up: Path) -> None:
    """The README's walk-through: create, deploy --wait, list, inspect, scale, undeploy, delete."""
    (up / "sla.json").write_text(json.dumps(sla(sleeper("web", 6101), sleeper("cache", 6102), app="readme")))
    out = run_oak(up, "app", "create", str(up / "sla.json")).stdout
    assert "readme" in out
    assert "readme.test.web.test" in out
    deploy = run_oak(up, "service", "deploy", "readme.test.web.test", "--replicas", "2", "--wait")
    assert "RUNNING" in deploy.stdout
    assert "#0" in deploy.stderr, "deploy --wait shows progress"
    assert "RUNNING" in run_oak(up, "service", "deploy", "readme.test.cache.test", "--wait").stdout
    listing = run_oak(up, "service", "list").stdout.splitlines()
    assert listing[0].split() == ["SERVICE", "ID", "STATUS", "REPLICAS", "VIRT", "RR", "IP", "CODE"]
    assert "10.30.0." in listing[1], "each service has its round-robin IP"
    assert any(line.startswith("readme.test.web.test") and "RUNNING" in line for line in listing)
    inspect = json.loads(run_oak(up, "service", "inspect", "readme.test.web.test", "--json").stdout)
    assert [(i["number"], i["node"], i["cluster"]) for i in inspect["instances"]] == [(0, "solo", "cluster1"),
                                                                                    (1, "solo", "cluster1")]
    run_oak(up, "service", "scale", "readme.test.web.test", "1")
    run_oak(up, "service", "undeploy", "readme.test.web.test")
    clusters = run_oak(up, "cluster", "list").stdout
    assert "cluster1" in clusters
    assert "online" in clusters.splitlines()[1].split(), "its state"
    assert "solo" in run_oak(up, "node", "list").stdout
    assert "deleted" in run_oak(up, "app", "delete", "readme").stdout
    assert run_oak(up, "app", "list").stdout.strip() == "no applications"


def test_cli_errors_are_one_line_and_non_zero(up: Path, tmp_path: Path) -> None:
    """Mistakes print one clear line on stderr and exit 1."""
    for args, expected in [
        (["service", "deploy", "nope.x.y.z"], "no service 'nope.x.y.z'"),
        (["app", "create", str(tmp_path / "missing.json")], "cannot read"),
        (["app", "delete", "ghost"], "no application 'ghost'"),
    ]:
        done = run_oak(up, *args, check=False)
        assert done.returncode == 1
        assert expected in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
    (tmp_path / "bad.json").write_text('{"sla_version": "v1.0", "customerID": "x", "applications": []}')
    done = run_oak(up, "app", "create", str(tmp_path / "bad.json"), check=False)
    assert done.returncode == 1
    assert "sla_version" in done.stderr
    done = subprocess.run(oak("app", "list", "--data-dir", str(tmp_path / "nowhere")), capture_output=True,
                          text=True, cwd=REPO)
    assert done.returncode == 1
    assert "no credentials" in done.stderr


def test_seed_commands_verbatim(tmp_path: Path) -> None:
    """`NetManager -p PORT` and `NodeEngine -n PORT -p 10100 -a HOST` join a cluster as in the seed guide; as root,
    on a pretend host, the NetManager runs the overlay and the NodeEngine's instances get their IPs from it."""
    lab = Lab() if overlay_unavailable() == "" else None
    stack = Stack(tmp_path)
    netcfg = tmp_path / "netcfg.json"
    try:
        stack.root()
        stack.cluster("c1")
        if lab:
            lab.host("h1")
        address = lab.addresses["h1"] if lab else "127.0.0.1"
        home = tmp_path / "root"
        wait_until(lambda: (home / "credentials.json").exists(), what="root up")
        made = json.loads(run_oak(home, "token", "create", "--uses", "1", "--ttl", "10m", "--json").stdout)
        assert "NodeEngine" in made["command"]
        assert made["fingerprint"] in made["command"]
        netcfg.write_text(json.dumps({"NodePublicAddress": address, "NodePublicPort": "50103",
                                      "ClusterUrl": "localhost", "ClusterMqttPort": str(stack.cluster_ports["c1"]),
                                      "JoinToken": made["token"], "CaFingerprint": made["fingerprint"]}))
        nm_port = free_port()
        bin_dir = Path(sys.executable).parent
        host = ["--host-netns", lab.hosts["h1"]] if lab else []
        stack.procs["nm"] = Proc("nm", [str(bin_dir / "NetManager"), "-p", str(nm_port), "--netcfg", str(netcfg),
                                        "--data-dir", str(tmp_path / "nm"), *host], tmp_path).start()
        wait_until(lambda: "listening" in stack.procs["nm"].tail(), what="NetManager up")
        stack.procs["ne"] = Proc("ne", [str(bin_dir / "NodeEngine"), "-n", str(nm_port), "-p", "10100", "-a",
                                        "127.0.0.1", "--netcfg", str(netcfg), "--name", "seedworker",
                                        "--data-dir", str(tmp_path / "ne")], tmp_path).start()
        wait_until(lambda: "seedworker" in run_oak(home, "node", "list", check=False).stdout, what="worker joined")
        log = stack.procs["ne"].tail()
        assert "using the cluster broker on port" in log
        assert "answers: ok" in log
        if lab:
            assert f"overlay endpoint {address}:50103" in log
            doc = tmp_path / "sla.json"
            doc.write_text(json.dumps(sla(sleeper("seedling", 3602))))
            run_oak(home, "app", "create", str(doc))
            run_oak(home, "service", "deploy", "demo.test.seedling.test")
            wait_until(lambda: "10.18." in run_oak(home, "service", "inspect", "demo.test.seedling.test").stdout,
                       what="the instance's overlay IP")
        netcfg.write_text('{"ClusterMqttPort": "not-a-port"}')
        bad = subprocess.run([str(bin_dir / "NodeEngine"), "-a", "127.0.0.1", "--netcfg", str(netcfg)],
                             capture_output=True, text=True, timeout=30)
        assert bad.returncode == 1
        assert "ClusterMqttPort" in bad.stderr
    finally:
        stack.stop()
        if lab:
            lab.remove()


def test_mosquitto_script_creates_deploys_and_watches(stack: Stack) -> None:
    """A shell script with mosquitto_pub/mosquitto_sub drives the API exactly as the README shows."""
    need_binary("mosquitto_pub")
    stack.root()
    stack.cluster("c1")
    stack.worker("w1", "c1")
    home = stack.base / "root"
    wait_until(lambda: "w1" in run_oak(home, "node", "list", check=False).stdout, what="w1 joined")
    creds = json.loads((home / "credentials.json").read_text())
    user, password = creds["username"], creds["password"]
    common = ["-V", "mqttv311", "-h", "127.0.0.1", "-p", str(stack.root_port), "--cafile", creds["ca"], "-u", user,
              "-P", password, "-q", "1"]
    (stack.base / "sla.json").write_text(json.dumps(sla(sleeper("job", 6201), app="script")))
    responses = subscribed(["mosquitto_sub", *common, "-t", f"oak/api/{user}/response/#", "-v", "-C", "3"])
    subprocess.run(["mosquitto_pub", *common, "-t", f"oak/api/{user}/request/apps/create", "-f",
                    str(stack.base / "sla.json")], check=True, timeout=10)
    subprocess.run(["mosquitto_pub", *common, "-t", f"oak/api/{user}/request/services/deploy", "-m",
                    '{"service": "script.test.job.test", "replicas": 2, "transaction": "t-42"}'], check=True,
                   timeout=10)
    subprocess.run(["mosquitto_pub", *common, "-t", f"oak/api/{user}/request/apps/create", "-m", "garbage"],
                   check=True, timeout=10)
    lines = [line.split(" ", 1) for line in messages(responses, 20)]
    answers: dict[str, list[dict]] = {}
    for topic, body in lines:
        answers.setdefault("/".join(topic.split("/")[-2:]), []).append(json.loads(body))
    assert [a["ok"] for a in answers["apps/create"]] == [True, False], "the SLA is accepted, the garbage is not"
    assert answers["apps/create"][1]["error"]["code"] == "bad_request"
    assert answers["services/deploy"][0]["ok"] is True
    assert answers["services/deploy"][0]["transaction"] == "t-42"
    state_topic = f"oak/api/{user}/state/services/script.test.job.test"

    def running() -> bool:
        got = subprocess.run(["mosquitto_sub", *common, "-t", state_topic, "-C", "1", "-W", "5"],
                             capture_output=True, text=True, timeout=10)
        return got.returncode == 0 and decode(got.stdout.strip()).data["status"] == "RUNNING"

    wait_until(running, what="the retained state says RUNNING")
    spy = subprocess.run(["mosquitto_sub", *common, "-t", "oak/#", "-C", "1", "-W", "2"], capture_output=True,
                         text=True, timeout=10)
    assert spy.stdout == "", "a user cannot subscribe to everything"


def test_tls_by_default_plain_on_loopback_and_websockets(stack: Stack) -> None:
    """The root listens with TLS, its certificate verified by the CA in credentials.json (by mosquitto's
    clients, which check the address too, and by openssl); plain TCP reaches it only on loopback and only
    with --plain-loopback, and so do websockets (--ws-port); the same credentials and rules everywhere."""
    need_binary("openssl")
    need_binary("mosquitto_pub")
    plain_port, ws_port = free_port(), free_port()
    stack.root("--plain-loopback", "--plain-port", str(plain_port), "--ws-port", str(ws_port))
    home = stack.base / "root"
    wait_until(lambda: (home / "credentials.json").exists(), what="root up")
    creds = json.loads((home / "credentials.json").read_text())
    user, password, ca = creds["username"], creds["password"], creds["ca"]
    assert creds["root"] == f"mqtts://127.0.0.1:{stack.root_port}"
    shown = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{stack.root_port}", "-CAfile", ca,
                            "-verify_return_error", "-brief"], input="", capture_output=True, text=True, timeout=20)
    assert "Verification: OK" in shown.stderr, shown.stderr
    assert "Oakling root CA broker" in shown.stderr, shown.stderr
    tls = ["-V", "mqttv311", "-h", "127.0.0.1", "-p", str(stack.root_port), "--cafile", ca, "-u", user,
           "-P", password, "-q", "1"]
    answer = subscribed(["mosquitto_sub", *tls, "-t", f"oak/api/{user}/response/apps/list", "-C", "1", "-W", "10"])
    subprocess.run(["mosquitto_pub", *tls, "-t", f"oak/api/{user}/request/apps/list", "-m", "{}"], check=True,
                   timeout=10)
    assert [untimed(json.loads(line)) for line in messages(answer, 15)] == [{"ok": True, "data": []}]
    wrong = subprocess.run(["mosquitto_pub", *tls[:-4], "-u", user, "-P", "wrong", "-t", "x", "-m", "x"],
                           capture_output=True, text=True, timeout=10)
    assert wrong.returncode != 0
    login = ["-V", "mqttv311", "-h", "127.0.0.1", "-u", user, "-P", password, "-t", "x", "-m", "x"]
    for port, works in [(stack.root_port, False), (plain_port, True)]:
        done = subprocess.run(["mosquitto_pub", "-p", str(port), *login], capture_output=True, timeout=10)
        assert (done.returncode == 0) is works, f"plain TCP on port {port}: {done.stderr!r}"

    async def over_websocket() -> dict:
        from amqtt.client import MQTTClient

        client = MQTTClient(config={"auto_reconnect": False})
        await client.connect(f"ws://{user}:{password}@127.0.0.1:{ws_port}/")
        await client.subscribe([(f"oak/api/{user}/response/apps/list", 1)])
        await client.publish(f"oak/api/{user}/request/apps/list", b"{}", qos=1)
        message = await client.deliver_message(timeout_duration=10)
        await client.disconnect()
        return json.loads(message.publish_packet.payload.data)

    import asyncio

    assert untimed(asyncio.run(over_websocket())) == {"ok": True, "data": []}


def test_the_version_is_the_packages() -> None:
    """`oak --version` says the version pyproject.toml gives the installed package (one place, not three)."""
    from importlib import metadata

    done = subprocess.run(oak("--version"), capture_output=True, text=True, cwd=REPO, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"oak {metadata.version('oakling')}"


def test_plugins_list_shows_every_installed_plugin_with_its_origin() -> None:
    """`oak plugins list` names each scheduler, runtime and collector, its package and version and the module
    it comes from (read from the entry points, nothing imported); --json gives the same as data."""
    from importlib import metadata

    done = subprocess.run(oak("plugins", "list", "--json"), capture_output=True, text=True, cwd=REPO, timeout=30)
    assert done.returncode == 0, done.stderr
    rows = {(p["kind"], p["name"]): p for p in json.loads(done.stdout)}
    for kind, group in (("scheduler", "oak.schedulers"), ("runtime", "oak.runtimes"), ("collector", "oak.collectors")):
        for ep in metadata.entry_points(group=group):
            assert rows[(kind, ep.name)]["source"] == ep.value
    assert rows[("runtime", "process")]["distribution"] == "oakling"
    assert rows[("runtime", "process")]["version"] == metadata.version("oakling")
    table = subprocess.run(oak("plugins", "list"), capture_output=True, text=True, cwd=REPO, timeout=30).stdout
    assert table.splitlines()[0].split() == ["KIND", "NAME", "PACKAGE", "VERSION", "FROM"]
    assert len(table.splitlines()) == len(rows) + 1
