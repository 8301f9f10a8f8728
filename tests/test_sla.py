"""SLA v2.0 parsing: Oakestra's documents are accepted as they are, every bad one names its field."""

from __future__ import annotations

import copy
import json
import random
from typing import Any

import pytest

from services.common.sla import AppSpec, ServiceSpec, SlaError, parse_sla

CURL: dict[str, Any] = {
    "microserviceID": "", "microservice_name": "curl", "microservice_namespace": "test",
    "virtualization": "container", "code": "docker.io/curlimages/curl:7.82.0",
    "cmd": ["sh", "-c", "curl 10.30.30.30 ; sleep 5"], "memory": 100, "vcpus": 1, "vgpus": 0, "storage": 0,
    "port": "", "environment": ["A=1"], "one_shot": False, "constraints": [],
}
NGINX: dict[str, Any] = {
    "microserviceID": "", "microservice_name": "nginx", "microservice_namespace": "test",
    "virtualization": "container", "code": "docker.io/library/nginx:latest", "memory": 100, "vcpus": 1,
    "port": "6080:80/tcp", "addresses": {"rr_ip": "10.30.30.30"},
    "constraints": [{"type": "direct", "cluster": "cluster1", "node": "worker-hostname"}],
    "volumes": [{"volume_id": "web", "csi_driver": "csi.oakestra.io/hostpath", "mount_path": "/usr/share/nginx/html"}],
}
SAMPLE: dict[str, Any] = {
    "sla_version": "v2.0", "customerID": "Admin",
    "applications": [{"applicationID": "", "application_name": "clientsrvr", "application_namespace": "test",
                      "application_desc": "curl client + nginx", "microservices": [CURL, NGINX]}],
}
M0 = "applications[0].microservices[0]"
M1 = "applications[0].microservices[1]"


def edit(path: str, value: Any = None, *, delete: bool = False, base: dict[str, Any] = SAMPLE) -> dict[str, Any]:
    """A deep copy of *base* with the field at *path* (``a.b[0].c``) set to *value*, or deleted."""
    doc = copy.deepcopy(base)
    parts = [int(p) if p.isdigit() else p for p in path.replace("[", ".").replace("]", "").split(".")]
    target: Any = doc
    for part in parts[:-1]:
        target = target[part]
    if delete:
        del target[parts[-1]]
    else:
        target[parts[-1]] = value
    return doc


def service(**fields: Any) -> dict[str, Any]:
    """The SAMPLE document with a single microservice made of *fields* over minimal defaults."""
    micro = {"microservice_name": "svc", "microservice_namespace": "ns", "virtualization": "container",
             "code": "img:1", **fields}
    return edit("applications[0].microservices", [micro])


def only(doc: dict[str, Any]) -> ServiceSpec:
    """The one service of a one-service document."""
    (app,) = parse_sla(doc)
    (spec,) = app.services
    return spec


# ---- the valid sample --------------------------------------------------------------------------

SAMPLE_SPECS = (
    ServiceSpec(app_name="clientsrvr", app_namespace="test", name="curl", namespace="test",
                virtualization="container", code="docker.io/curlimages/curl:7.82.0",
                cmd=("sh", "-c", "curl 10.30.30.30 ; sleep 5"), environment=("A=1",), memory=100, vcpus=1),
    ServiceSpec(app_name="clientsrvr", app_namespace="test", name="nginx", namespace="test",
                virtualization="container", code="docker.io/library/nginx:latest", memory=100, vcpus=1,
                port="6080:80/tcp", rr_ip="10.30.30.30", clusters=("cluster1",), nodes=("worker-hostname",),
                constraints=({"type": "direct", "cluster": "cluster1", "node": "worker-hostname"},),
                extra={"volumes": NGINX["volumes"]}),
)


@pytest.mark.parametrize("payload", [
    json.dumps(SAMPLE).encode(),
    json.dumps(SAMPLE),
    bytearray(json.dumps(SAMPLE).encode()),
    json.dumps(SAMPLE, indent=2).encode("utf-16"),  # json.loads detects UTF-16/32 by itself
    SAMPLE,
], ids=["bytes", "str", "bytearray", "utf-16", "dict"])
def test_oakestra_sample_parses(payload: Any) -> None:
    """Oakestra's two-service sample gives the expected specs and job names, however it is handed over."""
    (app,) = parse_sla(payload)
    assert (app.name, app.namespace, app.desc) == ("clientsrvr", "test", "curl client + nginx")
    assert app.services == SAMPLE_SPECS
    assert [s.job_name for s in app.services] == ["clientsrvr.test.curl.test", "clientsrvr.test.nginx.test"]


def test_specs_do_not_share_the_input() -> None:
    """Changing the document after parsing leaves the specs alone."""
    doc = copy.deepcopy(SAMPLE)
    (app,) = parse_sla(doc)
    doc["applications"][0]["microservices"][1]["constraints"][0]["cluster"] = "elsewhere"
    doc["applications"][0]["microservices"][1]["volumes"].clear()
    assert app.services == SAMPLE_SPECS


# ---- valid variations, one aspect each ----------------------------------------------------------

GOOD = [
    ("docker alias", service(virtualization="docker"), "virtualization", "container"),
    ("other runtime", service(virtualization="runsc"), "virtualization", "runsc"),
    ("unikernel", service(virtualization="unikernel", code="https://x/k.tar.gz", arch=["amd64"]),
     "extra", {"arch": ["amd64"]}),
    ("microvm per arch", service(virtualization="microvm", code="/k/x86.tar, /k/arm.tar", arch=["amd64", "arm64"]),
     "extra", {"arch": ["amd64", "arm64"]}),
    ("unikernel without arch", service(virtualization="unikernel", code="/k/vmlinuz"), "code", "/k/vmlinuz"),
    ("process", service(virtualization="process", code="", cmd=["sleep", "60"]), "cmd", ("sleep", "60")),
    ("process with code", service(virtualization="process", code="/bin", cmd=["sleep", "1"]), "code", "/bin"),
    ("vcpu alias", service(vcpu=2), "vcpus", 2),
    ("vcpu alias fraction", service(vcpu=0.5), "vcpus", 0.5),
    ("vcpus wins over vcpu", service(vcpus=3, vcpu=1), "vcpus", 3),
    ("fractional vcpus", service(vcpus=0.25), "vcpus", 0.25),
    ("memory as whole float", service(memory=64.0), "memory", 64),
    ("defaults", service(), "memory", 0),
    ("single port", service(port="80"), "port", "80"),
    ("several ports", service(port="6080:80/tcp;53:53/udp;8080:8080"), "port", "6080:80/tcp;53:53/udp;8080:8080"),
    ("env with = in value", service(environment=["URL=a=b", "_X="]), "environment", ("URL=a=b", "_X=")),
    ("one_shot", service(one_shot=True), "one_shot", True),
    ("privileged", service(privileged=True), "privileged", True),
    ("rr_ip edge", service(addresses={"rr_ip": "10.30.255.254"}), "rr_ip", "10.30.255.254"),
    ("empty rr_ip", service(addresses={"rr_ip": ""}), "rr_ip", ""),
    ("other addresses kept", service(addresses={"rr_ip": "10.30.0.9", "rr_ip_v6": "fdff::9"}),
     "extra", {"addresses": {"rr_ip_v6": "fdff::9"}}),
    ("extras kept", service(platform="linux/arm64", connectivity=[], state=""), "extra",
     {"platform": "linux/arm64", "connectivity": [], "state": ""}),
    ("direct clusters by ;", service(constraints=[{"type": "direct", "cluster": "c1;c2"}]), "clusters", ("c1", "c2")),
    ("direct clusters by ,", service(constraints=[{"type": "direct", "cluster": "c1, c2"}]), "clusters", ("c1", "c2")),
    ("direct clusters as list", service(constraints=[{"type": "direct", "cluster": ["c1", "c2"]}]),
     "clusters", ("c1", "c2")),
    ("direct nodes", service(constraints=[{"type": "direct", "node": "n1;n2", "cluster": ""}]), "nodes", ("n1", "n2")),
    ("direct merged",
     service(constraints=[{"type": "direct", "cluster": "c1"}, {"type": "direct", "cluster": "c2;c1"}]),
     "clusters", ("c1", "c2")),
    ("addons", service(constraints=[{"type": "addons", "needs": ["gpu", "ssd"]}]), "needs", ("gpu", "ssd")),
    ("geo", service(constraints=[{"type": "geo", "location": "48.1,11.6", "threshold": 50}]),
     "near", ((48.1, 11.6, 50.0),)),
    ("latency", service(constraints=[{"type": "latency", "target": "w1", "threshold": 20}]),
     "latency", (("w1", 20.0),)),
    ("clusters type", service(constraints=[{"type": "clusters", "allowed": ["a"]}]),
     "constraints", ({"type": "clusters", "allowed": ["a"]},)),
]


@pytest.mark.parametrize(("doc", "attr", "expected"), [g[1:] for g in GOOD], ids=[g[0] for g in GOOD])
def test_valid_variations(doc: dict[str, Any], attr: str, expected: Any) -> None:
    """Each valid variation parses, and the spec shows it."""
    assert getattr(only(doc), attr) == expected


def test_vcpu_alias_keeps_out_of_extra() -> None:
    """'vcpu' is a field, not an extra, and its type is kept."""
    spec = only(service(vcpu=2))
    assert spec.extra == {}
    assert isinstance(spec.vcpus, int)


def test_empty_microservices_and_several_apps() -> None:
    """An application may have no services; several applications (different names) are fine."""
    doc = copy.deepcopy(SAMPLE)
    doc["applications"].append({"application_name": "other", "application_namespace": "test", "microservices": []})
    doc["applications"].append({"application_name": "clientsrvr", "application_namespace": "prod",
                                "microservices": [CURL]})
    apps = parse_sla(doc)
    assert [(a.name, a.namespace, len(a.services)) for a in apps] == [("clientsrvr", "test", 2), ("other", "test", 0),
                                                                      ("clientsrvr", "prod", 1)]
    assert apps[1].desc == ""
    assert apps[2].services[0].job_name == "clientsrvr.prod.curl.test"


# ---- round trip ---------------------------------------------------------------------------------


@pytest.mark.parametrize("doc", [SAMPLE] + [g[1] for g in GOOD], ids=["sample"] + [g[0] for g in GOOD])
def test_round_trip(doc: dict[str, Any]) -> None:
    """to_dict is JSON, and from_dict gives back the very same specs, also after a trip through JSON."""
    for app in parse_sla(doc):
        data = json.loads(json.dumps(app.to_dict(), allow_nan=False))
        assert AppSpec.from_dict(data) == app
        assert AppSpec.from_dict(app.to_dict()) == app
        for spec in app.services:
            again = ServiceSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
            assert again == spec
            assert again.job_name == spec.job_name
            assert (again.needs, again.near, again.latency) == (spec.needs, spec.near, spec.latency)


# ---- invalid documents: each names its culprit ---------------------------------------------------

BAD: list[tuple[str, Any, str]] = [
    ("garbage bytes", b"\x00\x01garbage", "$"),
    ("invalid utf-8", b'{"sla_version": "v2.0\xff\xfe"}', "$"),
    ("empty bytes", b"", "$"),
    ("truncated json", json.dumps(SAMPLE)[:-3], "$"),
    ("deeply nested", "[" * 100_000 + "]" * 100_000, "$"),
    ("a list", b"[]", "$"),
    ("null", b"null", "$"),
    ("a number", b"42", "$"),
    ("a string", '"v2.0"', "$"),
    ("python list", [SAMPLE], "$"),
    ("python none", None, "$"),
    ("missing sla_version", edit("sla_version", delete=True), "$.sla_version"),
    ("sla_version not a string", edit("sla_version", 2.0), "$.sla_version"),
    ("wrong version", edit("sla_version", "v1.0"), "sla_version"),
    ("missing customerID", edit("customerID", delete=True), "$.customerID"),
    ("customerID a number", edit("customerID", 7), "$.customerID"),
    ("missing applications", edit("applications", delete=True), "applications"),
    ("empty applications", edit("applications", []), "applications"),
    ("applications an object", edit("applications", {}), "applications"),
    ("application not an object", edit("applications[0]", "app"), "applications[0]"),
    ("missing app name", edit("applications[0].application_name", delete=True), "applications[0].application_name"),
    ("app name with dot", edit("applications[0].application_name", "a.b"), "applications[0].application_name"),
    ("app name too long", edit("applications[0].application_name", "a" * 31), "applications[0].application_name"),
    ("app name trailing newline", edit("applications[0].application_name", "abc\n"),
     "applications[0].application_name"),
    ("app name empty", edit("applications[0].application_name", ""), "applications[0].application_name"),
    ("app namespace number", edit("applications[0].application_namespace", 1),
     "applications[0].application_namespace"),
    ("app desc number", edit("applications[0].application_desc", 1), "applications[0].application_desc"),
    ("applicationID given", edit("applications[0].applicationID", "abc"), "applications[0].applicationID"),
    ("missing microservices", edit("applications[0].microservices", delete=True), "applications[0].microservices"),
    ("microservices null", edit("applications[0].microservices", None), "applications[0].microservices"),
    ("duplicate application", edit("applications", [SAMPLE["applications"][0]] * 2), "applications[1]"),
    ("service not an object", edit(M0, ["curl"]), M0),
    ("microserviceID given", edit(f"{M1}.microserviceID", "abc"), f"{M1}.microserviceID"),
    ("missing service name", edit(f"{M0}.microservice_name", delete=True), f"{M0}.microservice_name"),
    ("service name with dash", edit(f"{M0}.microservice_name", "my-svc"), f"{M0}.microservice_name"),
    ("service namespace unicode", edit(f"{M0}.microservice_namespace", "tëst"), f"{M0}.microservice_namespace"),
    ("missing virtualization", edit(f"{M0}.virtualization", delete=True), f"{M0}.virtualization"),
    ("virtualization uppercase", edit(f"{M0}.virtualization", "Docker"), f"{M0}.virtualization"),
    ("virtualization spaces", edit(f"{M0}.virtualization", "my runtime"), f"{M0}.virtualization"),
    ("virtualization list", edit(f"{M0}.virtualization", ["container"]), f"{M0}.virtualization"),
    ("missing code", edit(f"{M0}.code", delete=True), f"{M0}.code"),
    ("container with empty code", edit(f"{M0}.code", ""), f"{M0}.code"),
    ("process without code key", edit(f"{M0}.code", delete=True, base=service(virtualization="process", cmd=["true"])),
     f"{M0}.code"),
    ("code null", edit(f"{M0}.code", None), f"{M0}.code"),
    ("process with empty cmd", service(virtualization="process", code="", cmd=[]), f"{M0}.cmd"),
    ("process without cmd", service(virtualization="process", code=""), f"{M0}.cmd"),
    ("process with empty program", service(virtualization="process", code="", cmd=["", "x"]), f"{M0}.cmd[0]"),
    ("arch a string", service(arch="amd64"), f"{M0}.arch"),
    ("arch with a number", service(arch=["amd64", 64]), f"{M0}.arch[1]"),
    ("arch with a space", service(arch=["amd 64"]), f"{M0}.arch[0]"),
    ("vm code entries without arch", service(virtualization="unikernel", code="/a,/b"), f"{M0}.arch"),
    ("vm arch count differs", service(virtualization="microvm", code="/a", arch=["amd64", "arm64"]), f"{M0}.arch"),
    ("vm empty code entry", service(virtualization="unikernel", code="/a,", arch=["amd64", "arm64"]), f"{M0}.code"),
    ("cmd a string", edit(f"{M0}.cmd", "sleep 5"), f"{M0}.cmd"),
    ("cmd with a number", edit(f"{M0}.cmd", ["sleep", 5]), f"{M0}.cmd[1]"),
    ("cmd with NUL", edit(f"{M0}.cmd", ["sh", "a\0b"]), f"{M0}.cmd[1]"),
    ("negative memory", edit(f"{M0}.memory", -1), f"{M0}.memory"),
    ("memory as string", edit(f"{M0}.memory", "100"), f"{M0}.memory"),
    ("memory as bool", edit(f"{M0}.memory", True), f"{M0}.memory"),
    ("memory null", edit(f"{M0}.memory", None), f"{M0}.memory"),
    ("memory fractional", edit(f"{M0}.memory", 1.5), f"{M0}.memory"),
    ("memory infinite", json.dumps(edit(f"{M0}.memory", float("inf"))), f"{M0}.memory"),
    ("memory NaN", json.dumps(edit(f"{M0}.memory", float("nan"))), f"{M0}.memory"),
    ("vcpus as bool", edit(f"{M0}.vcpus", False), f"{M0}.vcpus"),
    ("vcpus negative", edit(f"{M0}.vcpus", -0.5), f"{M0}.vcpus"),
    ("vcpus NaN", edit(f"{M0}.vcpus", float("nan")), f"{M0}.vcpus"),
    ("vcpu alias as string", service(vcpu="2"), f"{M0}.vcpu"),
    ("vgpus negative", edit(f"{M0}.vgpus", -1), f"{M0}.vgpus"),
    ("storage as list", edit(f"{M0}.storage", [1]), f"{M0}.storage"),
    ("env entry without =", edit(f"{M0}.environment", ["A=1", "B"]), f"{M0}.environment[1]"),
    ("env key with dash", edit(f"{M0}.environment", ["MY-KEY=1"]), f"{M0}.environment[0]"),
    ("env key starting with digit", edit(f"{M0}.environment", ["1A=1"]), f"{M0}.environment[0]"),
    ("env a dict", edit(f"{M0}.environment", {"A": "1"}), f"{M0}.environment"),
    ("env entry a number", edit(f"{M0}.environment", [1]), f"{M0}.environment[0]"),
    ("one_shot as string", edit(f"{M0}.one_shot", "false"), f"{M0}.one_shot"),
    ("one_shot as int", edit(f"{M0}.one_shot", 0), f"{M0}.one_shot"),
    ("privileged null", service(privileged=None), f"{M0}.privileged"),
    ("port too big", edit(f"{M1}.port", "99999:80"), f"{M1}.port"),
    ("port zero", edit(f"{M1}.port", "0"), f"{M1}.port"),
    ("port words", edit(f"{M1}.port", "http"), f"{M1}.port"),
    ("port bad protocol", edit(f"{M1}.port", "80:80/sctp"), f"{M1}.port"),
    ("port empty item", edit(f"{M1}.port", "80;;81"), f"{M1}.port"),
    ("port with spaces", edit(f"{M1}.port", "80 : 80"), f"{M1}.port"),
    ("port non-ascii digits", edit(f"{M1}.port", "\u0668\u0660"), f"{M1}.port"),
    ("port a number", edit(f"{M1}.port", 80), f"{M1}.port"),
    ("rr_ip outside 10.30/16", edit(f"{M1}.addresses.rr_ip", "10.31.0.1"), f"{M1}.addresses.rr_ip"),
    ("rr_ip not an address", edit(f"{M1}.addresses.rr_ip", "ten.thirty"), f"{M1}.addresses.rr_ip"),
    ("rr_ip ipv6", edit(f"{M1}.addresses.rr_ip", "fdff::1"), f"{M1}.addresses.rr_ip"),
    ("rr_ip a number", edit(f"{M1}.addresses.rr_ip", 10), f"{M1}.addresses.rr_ip"),
    ("addresses a string", edit(f"{M1}.addresses", "10.30.0.1"), f"{M1}.addresses"),
    ("constraints an object", edit(f"{M1}.constraints", {"type": "direct"}), f"{M1}.constraints"),
    ("constraint not an object", edit(f"{M1}.constraints", ["direct"]), f"{M1}.constraints[0]"),
    ("constraint without type", edit(f"{M1}.constraints[0].type", delete=True), f"{M1}.constraints[0].type"),
    ("constraint type a number", edit(f"{M1}.constraints[0].type", 1), f"{M1}.constraints[0].type"),
    ("unknown constraint type", edit(f"{M1}.constraints[0].type", "magic"), f"{M1}.constraints[0].type"),
    ("direct without targets", edit(f"{M1}.constraints[0]", {"type": "direct", "cluster": ""}),
     f"{M1}.constraints[0]"),
    ("direct cluster a number", edit(f"{M1}.constraints[0].cluster", 3), f"{M1}.constraints[0].cluster"),
    ("direct node list of numbers", edit(f"{M1}.constraints[0].node", [1]), f"{M1}.constraints[0].node"),
    ("geo bad location", service(constraints=[{"type": "geo", "location": "north", "threshold": 5}]),
     f"{M0}.constraints[0].location"),
    ("geo without threshold", service(constraints=[{"type": "geo", "location": "1,2"}]),
     f"{M0}.constraints[0].threshold"),
    ("latency without target", service(constraints=[{"type": "latency", "threshold": 5}]),
     f"{M0}.constraints[0].target"),
    ("addons without needs", service(constraints=[{"type": "addons", "needs": []}]), f"{M0}.constraints[0].needs"),
    ("duplicate service", edit(f"{M1}.microservice_name", "curl"), M1),
]


@pytest.mark.parametrize(("payload", "field"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_invalid_sla_names_the_field(payload: Any, field: str) -> None:
    """Each invalid document raises SlaError whose field is the exact culprit."""
    with pytest.raises(SlaError) as err:
        parse_sla(payload)
    assert err.value.field == field
    assert str(err.value) == f"{field}: {err.value.message}"
    assert isinstance(err.value, ValueError)


def test_no_crash_on_mutated_documents() -> None:
    """Replacing any node of the sample with any JSON value gives a result or an SlaError, nothing else."""
    rng = random.Random(2026)
    junk: list[Any] = [None, True, 0, -1, 1.5, "", "x", "10.30.0.1", [], [1], ["a"], {}, {"type": "direct"}]

    def paths(node: Any, prefix: str) -> list[str]:
        found = [prefix] if prefix else []
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
        for key, child in items:
            found += paths(child, f"{prefix}[{key}]" if isinstance(key, int) else f"{prefix}.{key}".lstrip("."))
        return found

    all_paths = paths(SAMPLE, "")
    for _ in range(2000):
        doc = copy.deepcopy(SAMPLE)
        for path in rng.sample(all_paths, 2):
            try:
                doc = edit(path, rng.choice(junk), delete=rng.random() < 0.2, base=doc)
            except (KeyError, IndexError, TypeError):
                continue  # an earlier edit removed the parent
        try:
            for app in parse_sla(json.dumps(doc)):
                assert AppSpec.from_dict(json.loads(json.dumps(app.to_dict()))) == app
        except SlaError:
            pass
