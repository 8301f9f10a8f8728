"""``first-fit``: the example plugin for scheduler authors; takes the first candidate, by name, that fits.

A scheduler plugin is any object with a ``name``, a ``filter`` and a ``score`` method (and, if it
wants, ``normalize``), handed out by an ``oak_make_scheduler`` hook implementation. This one:

* rejects candidates whose name is in its ``skip`` argument (``args = { skip = ["w3"] }``), to show
  how a filter explains itself;
* scores candidates so that the alphabetically first one wins, and normalises its raw scores to
  0..100 itself, to show ``normalize``.

To ship your own, copy this file into a package, declare it under the ``oak.schedulers`` entry-point
group, install it beside Oakling and name it in the profile (see docs/plugins.md).
"""

from __future__ import annotations

from typing import Any

from services.common.plugin_api import Candidate, Demand, hookimpl

NAME = "first-fit"


class FirstFit:
    """Prefer candidates whose id sorts first."""

    name = NAME

    def __init__(self, skip: tuple[str, ...] = ()) -> None:
        self.skip = skip

    def filter(self, demand: Demand, candidate: Candidate) -> str | None:
        """Reject the candidates the operator told us to skip."""
        return "skipped by first-fit" if candidate.id in self.skip else None

    def score(self, demand: Demand, candidate: Candidate) -> float:
        """A raw score that is higher for ids that sort first (normalised below)."""
        return -float(int.from_bytes(candidate.id.encode()[:8].ljust(8, b"\0"), "big"))

    def normalize(self, scores: dict[str, float]) -> dict[str, float]:
        """Rank the raw scores onto 0..100: the best gets 100, the worst 0."""
        ranked = sorted(scores, key=lambda cid: scores[cid])
        if len(ranked) == 1:
            return {ranked[0]: 100.0}
        return {cid: 100.0 * i / (len(ranked) - 1) for i, cid in enumerate(ranked)}


@hookimpl
def oak_make_scheduler(name: str, args: dict[str, Any]) -> FirstFit | None:
    """Build the plugin when the profile names it; ``args``: ``skip``, a list of candidate ids."""
    if name != NAME:
        return None
    skip = args.get("skip", [])
    if not isinstance(skip, list) or not all(isinstance(s, str) for s in skip) or set(args) - {"skip"}:
        raise ValueError("first-fit takes one argument: skip = [candidate ids]")
    return FirstFit(tuple(skip))
