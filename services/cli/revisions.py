"""``oak service update | history | rollback | promote``: a service's revisions from a terminal.

``update`` sends the root the fields to change (``services/update``): those of a file (an SLA holding
the microservice, or a microservice object) and of the shortcuts, ``--env`` setting variables over the
current environment. ``--wait`` follows the rollout in the service's retained state, one line per
change, and fails when the rollout is reverted or fails.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from services.cli.client import CliError, OakClient
from services.cli.tables import table
from services.cli.views import rollout_text, service_text

Render = Any


async def revision_command(oak: OakClient, args: argparse.Namespace) -> tuple[Any, Render]:
    """Run ``oak service <action>`` for the revision actions."""
    if args.action == "history":
        return await oak.request("services", "history", {"service": args.service}), history_text
    if args.action == "promote":
        return await oak.request("services", "promote", {"service": args.service}), service_text
    if args.action == "rollback":
        body: dict[str, Any] = {"service": args.service}
        if args.revision is not None:
            body["revision"] = args.revision
        return await oak.request("services", "rollback", body), service_text
    changes = await _changes(oak, args)
    if not changes:
        raise CliError("nothing to update: give a FILE or --code, --cmd, --env, --memory or --vcpus")
    data = await oak.request("services", "update", {"service": args.service, "microservice": changes})
    if not data["changed"]:
        return data, lambda d: "nothing changed: no new revision"
    if args.wait and data["rollout"]["active"]:
        data = await _follow(oak, data, args.timeout)
    return data, lambda d: f"revision {d['revision']} ({', '.join(d['changed'])})\n{service_text(d)}"


async def _changes(oak: OakClient, args: argparse.Namespace) -> dict[str, Any]:
    """The microservice fields to change: the file's, then the shortcuts'."""
    changes: dict[str, Any] = {}
    current: dict[str, Any] | None = None
    if args.file or args.env:
        history = await oak.request("services", "history", {"service": args.service})
        current = next(r["spec"] for r in history if r["current"])
    if args.file:
        assert current is not None
        changes.update(_microservice(_read(args.file), current))
    if args.code is not None:
        changes["code"] = args.code
    if args.cmd is not None:
        changes["cmd"] = shlex.split(args.cmd)
    if args.env:
        assert current is not None
        variables = dict(entry.split("=", 1) for entry in changes.get("environment", current["environment"]))
        for entry in args.env:
            if "=" not in entry:
                raise CliError(f"--env {entry!r}: expected KEY=VALUE")
            key, value = entry.split("=", 1)
            variables[key] = value
        changes["environment"] = [f"{k}={v}" for k, v in variables.items()]
    if args.memory is not None:
        changes["memory"] = args.memory
    if args.vcpus is not None:
        changes["vcpus"] = args.vcpus
    return changes


def _read(path: str) -> Any:
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror}") from None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise CliError(f"{path} is not JSON: {exc}") from None


def _microservice(doc: Any, current: dict[str, Any]) -> dict[str, Any]:
    """The microservice in *doc*: *doc* itself, or the one of an SLA with the service's name."""
    if not isinstance(doc, dict):
        raise CliError("the file must hold an SLA or a microservice object")
    if "applications" not in doc:
        return doc
    name = (current["microservice_name"], current["microservice_namespace"])
    found = [m for app in doc.get("applications") or [] if isinstance(app, dict)
             for m in app.get("microservices") or []
             if isinstance(m, dict) and (m.get("microservice_name"), m.get("microservice_namespace")) == name]
    if not found:
        raise CliError(f"the SLA has no microservice {name[0]} (namespace {name[1]})")
    return dict(found[0])


async def _follow(oak: OakClient, data: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Follow the rollout until it ends; print a line whenever it moves."""
    revision, seen = data["revision"], [""]

    def progress(state: dict[str, Any]) -> None:
        rows = ", ".join(f"#{i['number']} r{i['revision']} {i['status']}"
                         + (f" {i['health']}" if i.get("health") else "") for i in state["instances"])
        line = f"{state['job_name']}: {rollout_text(state['rollout']).strip()} [{rows}]"
        if line != seen[-1]:
            seen.append(line)
            print(line, file=sys.stderr, flush=True)

    def done(state: dict[str, Any]) -> bool:
        rollout = state.get("rollout")
        if not rollout:
            return False  # the state from before the update
        if rollout["revision"] == revision or (rollout["state"] == "reverted" and rollout["previous"] == revision):
            return not rollout["active"] or rollout["state"] == "paused"
        return True  # another update took over

    state = await oak.follow(data["job_name"], timeout, progress, done, "finish its rollout")
    rollout = state["rollout"]
    if rollout["state"] in ("reverted", "failed"):
        raise CliError(f"{state['job_name']}: revision {revision} {rollout['state']}: {rollout['reason']}")
    if rollout["state"] == "paused":
        print(f"{state['job_name']}: canaries of revision {revision} run beside the old instances; "
              f"`oak service promote {state['job_name']}` goes on, `oak service rollback` goes back",
              file=sys.stderr)
    return {**state, "changed": data["changed"]}


def history_text(data: Any) -> str:
    """``oak service history``: one line per revision."""
    rows = [{**r, "at": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["at"])) if r["at"] else "-",
             "current": "*" if r["current"] else ""} for r in data]
    return table(rows, [("REVISION", "revision"), ("CURRENT", "current"), ("AT", "at"), ("CHANGED", "change")])
