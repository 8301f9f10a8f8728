"""Scheduling profiles: which plugins a root or cluster uses, their weights and arguments.

Given on the command line as ``--scheduler least-loaded,anti-affinity=2`` (names with optional
weights) or as a TOML file (``--scheduler-profile oak-scheduler.toml``)::

    [[plugins]]
    name = "least-loaded"          # required: an installed scheduler plugin
    weight = 1                     # optional, > 0, default 1

    [[plugins]]
    name = "geo"
    args = { default_km = 100 }    # optional: handed to the plugin's factory

An unknown plugin, a bad weight or an unknown key stops the service at startup with the field named.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pluggy

from services.common.plugins import load_scheduler
from services.common.scheduling import Profile, Weighted

DEFAULT = "least-loaded,labels,geo,latency"
KEYS = {"name", "weight", "args"}


class ProfileError(ValueError):
    """A scheduling profile is invalid; the message names the culprit."""


def parse_spec(spec: str) -> list[dict[str, Any]]:
    """Turn ``"least-loaded,anti-affinity=2"`` into profile entries."""
    entries: list[dict[str, Any]] = []
    for i, item in enumerate(filter(None, (part.strip() for part in spec.split(",")))):
        name, _, weight = item.partition("=")
        entry: dict[str, Any] = {"name": name.strip()}
        if weight:
            try:
                entry["weight"] = float(weight)
            except ValueError:
                raise ProfileError(f"plugins[{i}].weight: {weight!r} is not a number") from None
        entries.append(entry)
    if not entries:
        raise ProfileError("the profile names no scheduler plugin")
    return entries


def read_file(path: Path) -> list[dict[str, Any]]:
    """Read the ``[[plugins]]`` entries of a TOML profile."""
    try:
        doc = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ProfileError(f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"{path}: {exc}") from None
    unknown = sorted(set(doc) - {"plugins"})
    if unknown:
        raise ProfileError(f"{path}: unknown key {unknown[0]!r} (expected [[plugins]])")
    entries = doc.get("plugins")
    if not isinstance(entries, list) or not entries:
        raise ProfileError(f"{path}: plugins: expected at least one [[plugins]] entry")
    return entries


def build(pm: pluggy.PluginManager, entries: list[dict[str, Any]]) -> Profile:
    """Validate *entries* and build every plugin."""
    plugins = []
    for i, entry in enumerate(entries):
        where = f"plugins[{i}]"
        if not isinstance(entry, dict):
            raise ProfileError(f"{where}: expected a table")
        unknown = sorted(set(entry) - KEYS)
        if unknown:
            raise ProfileError(f"{where}.{unknown[0]}: unknown key (known: {', '.join(sorted(KEYS))})")
        name, weight, args = entry.get("name"), entry.get("weight", 1), entry.get("args", {})
        if not isinstance(name, str) or not name:
            raise ProfileError(f"{where}.name: expected a plugin name")
        if isinstance(weight, bool) or not isinstance(weight, int | float) or weight <= 0:
            raise ProfileError(f"{where}.weight: expected a positive number, got {weight!r}")
        if not isinstance(args, dict):
            raise ProfileError(f"{where}.args: expected a table")
        try:
            plugin = load_scheduler(pm, name, args)
        except ValueError as exc:
            raise ProfileError(f"{where} ({name}): {exc}") from None
        plugins.append(Weighted(plugin, float(weight)))
    return Profile(tuple(plugins))


def load(pm: pluggy.PluginManager, spec: str = DEFAULT, path: Path | None = None) -> Profile:
    """The profile from a file when given, else from the ``--scheduler`` spec."""
    return build(pm, read_file(path) if path else parse_spec(spec))
