"""SLA v2.0 validation: the good ones parse, every bad one names its field."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from services.common.sla import AppSpec, ServiceSpec, SlaError, parse_sla

GOOD: dict[str, Any] = {
    "sla_version": "v2.0", "customerID": "Admin",
    "applications": [{
        "applicationID": "", "application_name": "clientsrvr", "application_namespace": "test",
        "application_desc": "curl client + nginx",
        "microservices": [
            {"microserviceID": "", "microservice_name": "curl", "microservice_namespace": "test",
             "virtualization": "container", "code": "docker.io/curlimages/curl:7.82.0",
             "cmd": ["sh", "-c", "curl 10.30.30.30 ; sleep 5"], "memory": 100, "vcpus": 1, "vgpus": 0,
             "storage": 0, "port": "", "environment": ["A=1"], "one_shot": False, "constraints": []},
            {"microserviceID": "", "microservice_name": "nginx", "microservice_namespace": "test",
             "virtualization": "docker", "code": "docker.io/library/nginx:latest", "memory": 100, "vcpu": 2,
             "port": "6080:80/tcp;53:53/udp", "addresses": {"rr_ip": "10.30.30.30"},
             "constraints": [{"type": "direct", "cluster": "cluster1", "node": "n1;n2"}],
             "volumes": [{"volume_id": "web", "csi_driver": "csi.oakestra.io/hostpath"}]},
        ]}]}


def test_the_oakestra_sample_parses() -> None:
    """Oakestra's sample SLA gives two services with job names, aliases resolved, extras kept."""
    (app,) = parse_sla(json.dumps(GOOD).encode())
    curl, nginx = app.services
    assert (app.name, app.namespace, app.desc) == ("clientsrvr", "test", "curl client + nginx")
    assert [curl.job_name, nginx.job_name] == ["clientsrvr.test.curl.test", "clientsrvr.test.nginx.test"]
    assert nginx.virtualization == "container", "'docker' is Oakestra's alias for container"
    assert nginx.vcpus == 2, "'vcpu' is accepted for 'vcpus'"
    assert (nginx.clusters, nginx.nodes, nginx.rr_ip) == (("cluster1",), ("n1", "n2"), "10.30.30.30")
    assert nginx.extra == {"volumes": [{"volume_id": "web", "csi_driver": "csi.oakestra.io/hostpath"}]}
    assert curl.cmd == ("sh", "-c", "curl 10.30.30.30 ; sleep 5")
    assert curl.environment == ("A=1",)


def test_round_trips() -> None:
    """to_dict/from_dict give back the same specs."""
    (app,) = parse_sla(GOOD)
    assert AppSpec.from_dict(app.to_dict()) == app
    assert all(ServiceSpec.from_dict(s.to_dict()) == s for s in app.services)


def test_health_check() -> None:
    """``health`` becomes a typed check with Docker's defaults; a VM cannot run an exec check."""
    doc = copy.deepcopy(GOOD)
    doc["applications"][0]["microservices"][1]["health"] = {"type": "http", "port": 80, "path": "/ready",
                                                            "interval": 0.5}
    (app,) = parse_sla(doc)
    check = app.services[1].health
    assert check is not None
    assert (check.type, check.port, check.path, check.interval) == ("http", 80, "/ready", 0.5)
    assert (check.timeout, check.failures, check.start_period) == (2.0, 3, 0.0)
    assert app.services[0].health is None
    assert ServiceSpec.from_dict(json.loads(json.dumps(app.services[1].to_dict()))) == app.services[1]
    doc["applications"][0]["microservices"][1].update(virtualization="unikernel", code="/k",
                                                      health={"type": "exec", "cmd": ["true"]})
    with pytest.raises(SlaError, match="cannot run a command") as err:
        parse_sla(doc)
    assert err.value.field == f"{M1}.health.type"
    doc["applications"][0]["microservices"][1].update(virtualization="wasm", code="/m.wasm")
    with pytest.raises(SlaError, match="a wasm cannot run a command") as err:
        parse_sla(doc)
    doc["applications"][0]["microservices"][1].update(health=None, secrets=[{"name": "key", "file": "/run/key"}])
    with pytest.raises(SlaError, match="opens directories, not single files") as err:
        parse_sla(doc)
    assert err.value.field == f"{M1}.secrets[0].file"
    doc["applications"][0]["microservices"][1].update(secrets=[{"name": "key", "env": "KEY"}])
    assert parse_sla(doc)[0].services[1].virtualization == "wasm"
    doc["applications"][0]["microservices"][1].update(vgpus=1)
    with pytest.raises(SlaError, match="a wasm cannot be given GPUs") as err:
        parse_sla(doc)
    assert err.value.field == f"{M1}.vgpus"


def test_volumes_in_both_forms() -> None:
    """Oakling's volumes ({name, path}) become typed; Oakestra's CSI form stays in extra, as it was."""
    doc = copy.deepcopy(GOOD)
    doc["applications"][0]["microservices"][0]["volumes"] = [{"name": "data", "path": "/var/lib/app/"}]
    (app,) = parse_sla(doc)
    curl, nginx = app.services
    assert [(v.name, v.path) for v in curl.volumes] == [("data", "/var/lib/app")]
    assert "volumes" not in curl.extra
    assert nginx.volumes == ()
    assert nginx.extra["volumes"][0]["csi_driver"] == "csi.oakestra.io/hostpath"
    assert ServiceSpec.from_dict(json.loads(json.dumps(curl.to_dict()))) == curl


def test_process_service() -> None:
    """A process service needs no code, only its argv."""
    doc = copy.deepcopy(GOOD)
    doc["applications"][0]["microservices"] = [{"microservice_name": "s", "microservice_namespace": "n",
                                                "virtualization": "process", "code": "", "cmd": ["sleep", "1"]}]
    (app,) = parse_sla(doc)
    assert app.services[0].cmd == ("sleep", "1")


def bad(path: str, value: Any, delete: bool = False) -> dict[str, Any]:
    """GOOD with one field (dotted path, [i] for list items) changed or deleted."""
    doc = copy.deepcopy(GOOD)
    parts = path.replace("[", ".").replace("]", "").split(".")
    target: Any = doc
    for part in parts[:-1]:
        target = target[int(part)] if part.isdigit() else target[part]
    last: Any = int(parts[-1]) if parts[-1].isdigit() else parts[-1]
    if delete:
        del target[last]
    else:
        target[last] = value
    return doc


M0 = "applications[0].microservices[0]"
M1 = "applications[0].microservices[1]"
BAD = [
    ("garbage bytes", b"\x00\x01garbage", "$"),
    ("invalid utf-8", b"\xff\xfe\xfd", "$"),
    ("a list", b"[]", "$"),
    ("null", b"null", "$"),
    ("no version", bad("sla_version", None, delete=True), "$.sla_version"),
    ("old version", bad("sla_version", "v1.0"), "sla_version"),
    ("no customer", bad("customerID", None, delete=True), "$.customerID"),
    ("no applications", bad("applications", []), "applications"),
    ("app name with dots", bad("applications[0].application_name", "a.b"), "applications[0].application_name"),
    ("app name too long", bad("applications[0].application_name", "x" * 31), "applications[0].application_name"),
    ("app id given", bad("applications[0].applicationID", "abc"), "applications[0].applicationID"),
    ("microservices missing", bad("applications[0].microservices", None, delete=True),
     "applications[0].microservices"),
    ("service not an object", bad("applications[0].microservices[0]", "curl"), M0),
    ("service name", bad(f"{M0}.microservice_name", ""), f"{M0}.microservice_name"),
    ("service id given", bad(f"{M0}.microserviceID", "x"), f"{M0}.microserviceID"),
    ("no virtualization", bad(f"{M0}.virtualization", None, delete=True), f"{M0}.virtualization"),
    ("bad virtualization", bad(f"{M0}.virtualization", "Docker Engine"), f"{M0}.virtualization"),
    ("container without code", bad(f"{M0}.code", ""), f"{M0}.code"),
    ("negative memory", bad(f"{M0}.memory", -1), f"{M0}.memory"),
    ("memory as text", bad(f"{M0}.memory", "100"), f"{M0}.memory"),
    ("memory as bool", bad(f"{M0}.memory", True), f"{M0}.memory"),
    ("fractional memory", bad(f"{M0}.memory", 1.5), f"{M0}.memory"),
    ("vcpus as text", bad(f"{M0}.vcpus", "1"), f"{M0}.vcpus"),
    ("cmd not a list", bad(f"{M0}.cmd", "sleep 1"), f"{M0}.cmd"),
    ("cmd with a number", bad(f"{M0}.cmd", ["sleep", 1]), f"{M0}.cmd[1]"),
    ("env without =", bad(f"{M0}.environment", ["A=1", "B"]), f"{M0}.environment[1]"),
    ("one_shot as text", bad(f"{M0}.one_shot", "yes"), f"{M0}.one_shot"),
    ("bad port", bad(f"{M1}.port", "99999:80"), f"{M1}.port"),
    ("port words", bad(f"{M1}.port", "http"), f"{M1}.port"),
    ("rr_ip outside 10.30/16", bad(f"{M1}.addresses.rr_ip", "10.31.0.1"), f"{M1}.addresses.rr_ip"),
    ("rr_ip not an address", bad(f"{M1}.addresses.rr_ip", "ten"), f"{M1}.addresses.rr_ip"),
    ("unknown constraint", bad(f"{M1}.constraints[0].type", "magic"), f"{M1}.constraints[0].type"),
    ("empty direct", bad(f"{M1}.constraints[0]", {"type": "direct"}), f"{M1}.constraints[0]"),
    ("constraints not a list", bad(f"{M1}.constraints", {"type": "direct"}), f"{M1}.constraints"),
    ("duplicate service", bad(f"{M1}.microservice_name", "curl"), M1),
    ("health not an object", bad(f"{M0}.health", "http"), f"{M0}.health"),
    ("health without type", bad(f"{M0}.health", {"port": 80}), f"{M0}.health.type"),
    ("health of no known type", bad(f"{M0}.health", {"type": "grpc", "port": 80}), f"{M0}.health.type"),
    ("health field misspelt", bad(f"{M0}.health", {"type": "tcp", "port": 80, "intervall": 1}),
     f"{M0}.health.intervall"),
    ("exec check without cmd", bad(f"{M0}.health", {"type": "exec"}), f"{M0}.health.cmd"),
    ("tcp check without port", bad(f"{M0}.health", {"type": "tcp"}), f"{M0}.health.port"),
    ("http check port too big", bad(f"{M0}.health", {"type": "http", "port": 70000}), f"{M0}.health.port"),
    ("http path not a path", bad(f"{M0}.health", {"type": "http", "port": 80, "path": "x y"}), f"{M0}.health.path"),
    ("check interval zero", bad(f"{M0}.health", {"type": "tcp", "port": 80, "interval": 0}), f"{M0}.health.interval"),
    ("check timeout text", bad(f"{M0}.health", {"type": "tcp", "port": 80, "timeout": "2s"}), f"{M0}.health.timeout"),
    ("no failures allowed", bad(f"{M0}.health", {"type": "tcp", "port": 80, "failures": 0}), f"{M0}.health.failures"),
    ("secrets not a list", bad(f"{M0}.secrets", {"name": "a"}), f"{M0}.secrets"),
    ("secret name bad", bad(f"{M0}.secrets", [{"name": "A B", "env": "X"}]), f"{M0}.secrets[0].name"),
    ("secret as neither", bad(f"{M0}.secrets", [{"name": "a"}]), f"{M0}.secrets[0]"),
    ("secret as both", bad(f"{M0}.secrets", [{"name": "a", "env": "X", "file": "/x"}]), f"{M0}.secrets[0]"),
    ("secret env name bad", bad(f"{M0}.secrets", [{"name": "a", "env": "1X"}]), f"{M0}.secrets[0].env"),
    ("secret file relative", bad(f"{M0}.secrets", [{"name": "a", "file": "run/x"}]), f"{M0}.secrets[0].file"),
    ("secret file climbs", bad(f"{M0}.secrets", [{"name": "a", "file": "/run/../etc/x"}]), f"{M0}.secrets[0].file"),
    ("secret field misspelt", bad(f"{M0}.secrets", [{"name": "a", "env": "X", "envv": "Y"}]),
     f"{M0}.secrets[0].envv"),
    ("volumes not a list", bad(f"{M0}.volumes", {"name": "a"}), f"{M0}.volumes"),
    ("volume without path", bad(f"{M0}.volumes", [{"name": "data"}]), f"{M0}.volumes[0].path"),
    ("volume path relative", bad(f"{M0}.volumes", [{"name": "data", "path": "var/x"}]), f"{M0}.volumes[0].path"),
    ("volume at the root", bad(f"{M0}.volumes", [{"name": "data", "path": "/"}]), f"{M0}.volumes[0].path"),
    ("volume name bad", bad(f"{M0}.volumes", [{"name": "Data!", "path": "/x"}]), f"{M0}.volumes[0].name"),
    ("volume twice", bad(f"{M0}.volumes", [{"name": "d", "path": "/x"}, {"name": "d", "path": "/y"}]),
     f"{M0}.volumes[1].name"),
    ("registry secret name bad", bad(f"{M0}.registry_secret", "Bad Name"), f"{M0}.registry_secret"),
    ("negative start period", bad(f"{M0}.health", {"type": "tcp", "port": 80, "start_period": -1}),
     f"{M0}.health.start_period"),
]


@pytest.mark.parametrize(("payload", "field"), [(p, f) for _, p, f in BAD], ids=[n for n, _, _ in BAD])
def test_bad_slas_name_the_field(payload: Any, field: str) -> None:
    """Each invalid SLA raises SlaError whose field is the exact culprit."""
    with pytest.raises(SlaError) as err:
        parse_sla(payload)
    assert err.value.field == field
    assert str(err.value).startswith(f"{field}: ")


def test_process_without_cmd() -> None:
    """A process service with no command is refused, naming cmd."""
    doc = copy.deepcopy(GOOD)
    doc["applications"][0]["microservices"][0].update(virtualization="process", cmd=[])
    with pytest.raises(SlaError) as err:
        parse_sla(doc)
    assert err.value.field == f"{M0}.cmd"


def test_duplicate_application() -> None:
    """The same application twice in one SLA is refused."""
    doc = copy.deepcopy(GOOD)
    doc["applications"].append(copy.deepcopy(doc["applications"][0]))
    with pytest.raises(SlaError) as err:
        parse_sla(doc)
    assert err.value.field == "applications[1]"


def test_what_a_vm_and_a_process_take() -> None:
    """A VM takes secrets as files (its initramfs), not as variables, and sized volumes (disks) at plain paths;
    a registry_secret is for a container."""
    def vm(**fields: Any) -> dict[str, Any]:
        doc = copy.deepcopy(GOOD)
        doc["applications"][0]["microservices"][1].update(virtualization="microvm", code="/k", **fields)
        return doc

    (app,) = parse_sla(vm(secrets=[{"name": "key", "file": "/run/secrets/key"}]))
    assert [(s.name, s.file) for s in app.services[1].secrets] == [("key", "/run/secrets/key")]
    (app,) = parse_sla(vm(volumes=[{"name": "data", "path": "/data", "size_mb": 64}]))
    assert app.services[1].volumes[0].size_mb == 64
    process = bad(f"{M0}.virtualization", "process")
    process["applications"][0]["microservices"][0]["registry_secret"] = "reg"
    sized = bad(f"{M0}.volumes", [{"name": "data", "path": "/data", "size_mb": 64}])
    refused = ((vm(secrets=[{"name": "key", "env": "KEY"}]), f"{M1}.secrets[0].env", "has no environment"),
               (vm(registry_secret="reg"), f"{M1}.registry_secret", "a microvm pulls none"),
               (process, f"{M0}.registry_secret", "a process pulls none"),
               (vm(volumes=[{"name": "d", "path": "/a:b"}]), f"{M1}.volumes[0].path", "no spaces, ',' or ':'"),
               (vm(volumes=[{"name": "d", "path": "/d", "size_mb": 1 << 21}]), f"{M1}.volumes[0].size_mb", "at most"),
               (sized, f"{M0}.volumes[0].size_mb", "grows as it is written"))
    for doc, field, said in refused:
        with pytest.raises(SlaError, match=said) as err:
            parse_sla(doc)
        assert err.value.field == field
