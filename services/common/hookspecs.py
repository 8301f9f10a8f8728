"""The plugin contract of Oakling: every ``oak_*`` hook, documented like pytest's hookspecs.

Plugins are plain modules (or objects) carrying ``@hookimpl`` functions. Oakling finds them through the
entry-point groups ``oak.schedulers``, ``oak.runtimes`` and ``oak.collectors`` (its own built-ins are
declared there too) and asks them, by name, for the one the operator chose at startup.

pluggy calls hooks synchronously; a hook therefore *returns an object* whose methods may be async
(a :class:`Runtime`), it is never a coroutine itself. Always call hooks with keyword arguments.

This module holds the hooks only; the types they speak of, and ``hookimpl``, are in
:mod:`services.common.plugin_api`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

from services.common.plugin_api import PROJECT

if TYPE_CHECKING:
    from services.common.plugin_api import Collector, Runtime, SchedulerPlugin

hookspec = pluggy.HookspecMarker(PROJECT)


# --------------------------------------------------------------------------------------------------
# Hooks
# --------------------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def oak_make_runtime(name: str, config: dict[str, Any]) -> Runtime | None:
    """Return the runtime called *name*, built with *config*, or None if this plugin has no such runtime.

    Called once per runtime the worker was told to enable (``--runtime``), at worker startup.
    Stops at first non-None result.

    :param name: the runtime's name as the operator wrote it, e.g. ``"process"``.
    :param config: ``data_dir`` (the worker's data directory) plus any runtime options.
    """


@hookspec(firstresult=True)
def oak_make_collector(name: str) -> Collector | None:
    """Return the metrics collector called *name*, or None.

    Called once at worker startup. Stops at first non-None result.
    """


@hookspec(firstresult=True)
def oak_make_scheduler(name: str, args: dict[str, Any]) -> SchedulerPlugin | None:
    """Return the scheduler plugin called *name*, configured with *args*, or None.

    Called once per plugin of the scheduling profile, at root or cluster startup; the same plugins
    serve both tiers (the candidates are clusters at the root and workers at a cluster). Raise
    ``ValueError`` with a readable message for bad *args*. Stops at first non-None result.

    :param name: the plugin's name as the profile writes it, e.g. ``"least-loaded"``.
    :param args: the profile's ``args`` table for this plugin (``{}`` when it has none). An
        implementation may leave this parameter out if it takes no arguments.
    """
