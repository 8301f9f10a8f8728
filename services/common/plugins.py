"""The plugin manager: loads the plugin a service was told to use, by name, from entry points."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pluggy

from services.common import hookspecs
from services.common.plugin_api import Collector, HasFacts, Runtime, SchedulerPlugin

GROUPS = {"scheduler": "oak.schedulers", "runtime": "oak.runtimes", "collector": "oak.collectors"}


class PluginError(ValueError):
    """A plugin was asked for by name and cannot be found or built."""


def make_manager() -> pluggy.PluginManager:
    """Return a plugin manager that knows the ``oak_*`` hookspecs and no plugins yet."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    return pm


def _load(pm: pluggy.PluginManager, kind: str, name: str) -> None:
    """Register the entry point *name* of *kind*'s group (unless autoload is switched off).

    Plugins are registered as ``<group>:<name>``: a runtime and a collector may share a name.
    """
    if os.environ.get("OAK_DISABLE_PLUGIN_AUTOLOAD"):
        return
    from importlib.metadata import entry_points

    group = GROUPS[kind]
    for ep in entry_points(group=group, name=name):
        key = f"{group}:{ep.name}"
        if pm.get_plugin(key) is None and not pm.is_blocked(key):
            pm.register(ep.load(), name=key)
    pm.check_pending()


@dataclass(frozen=True)
class Installed:
    """One installed plugin as its entry point declares it: nothing of it is imported to list it."""

    kind: str  # scheduler, runtime or collector
    name: str
    distribution: str  # the package that provides it
    version: str
    source: str  # module:attribute


def installed() -> list[Installed]:
    """Every installed scheduler, runtime and collector plugin, by kind and name."""
    from importlib.metadata import entry_points

    found = []
    for kind, group in GROUPS.items():
        for ep in entry_points(group=group):
            dist = ep.dist
            found.append(Installed(kind, ep.name, dist.name if dist else "?", dist.version if dist else "?", ep.value))
    return sorted(found, key=lambda p: (p.kind, p.name))


def available(kind: str) -> list[str]:
    """Names of the installed plugins of *kind* (``scheduler``, ``runtime`` or ``collector``)."""
    from importlib.metadata import entry_points

    return sorted(ep.name for ep in entry_points(group=GROUPS[kind]))


def _missing(kind: str, name: str) -> PluginError:
    names = ", ".join(available(kind)) or "none"
    return PluginError(f"no {kind} plugin named {name!r} (installed: {names})")


def load_runtime(pm: pluggy.PluginManager, name: str, config: dict[str, Any]) -> Runtime:
    """Return the runtime *name*; raise :class:`PluginError` naming the installed ones if it is unknown."""
    _load(pm, "runtime", name)
    runtime = pm.hook.oak_make_runtime(name=name, config=config)
    if runtime is None:
        raise _missing("runtime", name)
    return runtime  # type: ignore[no-any-return]


def runtime_labels(runtimes: Iterable[Runtime]) -> list[str]:
    """Node labels ``key=value`` from the runtimes' optional ``facts()`` (each runtime asked once)."""
    labels: list[str] = []
    for runtime in {id(r): r for r in runtimes}.values():
        if isinstance(runtime, HasFacts):
            labels += [f"{key}={value}" for key, value in runtime.facts().items()]
    return labels


def load_collector(pm: pluggy.PluginManager, name: str) -> Collector:
    """Return the metrics collector *name*."""
    _load(pm, "collector", name)
    collector = pm.hook.oak_make_collector(name=name)
    if collector is None:
        raise _missing("collector", name)
    return collector  # type: ignore[no-any-return]


def load_scheduler(pm: pluggy.PluginManager, name: str, args: dict[str, Any] | None = None) -> SchedulerPlugin:
    """Return the scheduler plugin *name* built with *args*."""
    _load(pm, "scheduler", name)
    scheduler = pm.hook.oak_make_scheduler(name=name, args=args or {})
    if scheduler is None:
        raise _missing("scheduler", name)
    return scheduler  # type: ignore[no-any-return]
