"""A constraint no enabled scheduler plugin evaluates is refused, not ignored (issue 15, point 6).

Tried as the issue did: a ``geo`` constraint on a root started with ``--scheduler least-loaded`` used to
be placed as if it were not there. Now the deploy is refused with ``missing_plugin``, naming the plugin
to enable; the same deploy on a root with the default plugins is accepted; a ``clusters`` constraint,
which the SLA format allows but nothing evaluates, is refused everywhere.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from plugins.schedulers.geo import Geo
from plugins.schedulers.labels import Labels
from plugins.schedulers.least_loaded import LeastLoaded
from services.cli.client import ApiFailure
from services.common.scheduling import Profile, Weighted, unevaluated
from tests.conftest import Stack, dumps, sla, sleeper

NEAR_MUNICH = {"type": "geo", "location": "48.1,11.6", "threshold": 100}


@pytest.fixture
def stack(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stack]:
    """A stack whose root runs with the extra flags the test gives (indirect parametrization)."""
    stack = Stack(tmp_path, root_args=getattr(request, "param", ()))
    try:
        yield stack
    finally:
        stack.stop()


def _app(*constraints: dict[str, Any]) -> bytes:
    return dumps(sla(sleeper("job", constraints=list(constraints)), app="geoapp"))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("stack", [("--scheduler", "least-loaded")], indirect=True)
async def test_a_constraint_no_plugin_evaluates_is_refused(stack: Stack, api: Any) -> None:
    """geo on a least-loaded root: missing_plugin, naming geo; nothing is placed; without it, accepted."""
    stack.root()
    admin = await api()
    await admin.request("apps", "create", raw=_app(NEAR_MUNICH))
    with pytest.raises(ApiFailure) as refused:
        await admin.request("services", "deploy", {"service": "geoapp.test.job.test", "replicas": 2})
    assert refused.value.code == "missing_plugin"
    assert "'geo' constraints" in str(refused.value)
    assert "enable 'geo'" in str(refused.value)
    (service,) = await admin.request("services", "list")
    assert service["instances"] == [], "nothing was placed"
    await admin.request("apps", "create", raw=dumps(sla(sleeper("plain"), app="plainapp")))
    await admin.request("services", "deploy", {"service": "plainapp.test.plain.test", "replicas": 1})


@pytest.mark.timeout(60)
async def test_the_default_plugins_take_geo_but_nothing_takes_clusters(stack: Stack, api: Any) -> None:
    """The default root accepts the geo deploy; a 'clusters' constraint is refused with no plugin to name."""
    stack.root()
    admin = await api()
    await admin.request("apps", "create", raw=_app(NEAR_MUNICH))
    await admin.request("services", "deploy", {"service": "geoapp.test.job.test", "replicas": 1})
    await admin.request("apps", "create", raw=dumps(sla(sleeper("c", constraints=[
        {"type": "clusters", "allowed": ["a"]}]), app="capp")))
    with pytest.raises(ApiFailure) as refused:
        await admin.request("services", "deploy", {"service": "capp.test.c.test", "replicas": 1})
    assert refused.value.code == "missing_plugin"
    assert "'clusters' constraints" in str(refused.value)


def test_which_constraints_a_profile_evaluates() -> None:
    """Plugins declare the constraint types they honour (ConstraintEvaluator); fit handles direct."""
    lean = Profile((Weighted(LeastLoaded()),))
    full = Profile((Weighted(LeastLoaded()), Weighted(Geo()), Weighted(Labels())))
    assert unevaluated(lean, ["direct", "geo", "addons"]) == ["addons", "geo"]
    assert unevaluated(full, ["direct", "geo", "addons"]) == []
    assert unevaluated(full, ["latency", "clusters"]) == ["clusters", "latency"]
