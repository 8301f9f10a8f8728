"""Every built-in scheduler plugin, table-driven, and scheduling profiles."""

from __future__ import annotations

from pathlib import Path

import pytest

from plugins.schedulers.anti_affinity import AntiAffinity
from plugins.schedulers.bin_pack import BinPack
from plugins.schedulers.first_fit import FirstFit
from plugins.schedulers.geo import Geo, distance_km
from plugins.schedulers.labels import Labels
from plugins.schedulers.latency import Latency
from plugins.schedulers.least_loaded import LeastLoaded
from services.common import profile
from services.common.plugin_api import Candidate, Demand, FilterPlugin, Normalizer, ScorePlugin
from services.common.plugins import PluginError, make_manager
from services.common.scheduling import Profile, Weighted, place, reserve

MUNICH, BERLIN, GARCHING = "48.137,11.575", "52.520,13.405", "48.249,11.651"


def cand(cid: str, cpu: float = 4, mem: float = 4096, labels: tuple[str, ...] = (), location: str = "",
         services: dict[str, int] | None = None, arch: str = "amd64", gpus: float = 0,
         coord: tuple[float, ...] = ()) -> Candidate:
    return Candidate(cid, cpu, mem, 4, 4096, ("process",), location=location, labels=labels,
                     services=services or {}, arch=arch, gpus_free=gpus, coord=coord)


def demand(**kw: object) -> Demand:
    return Demand(**{"vcpus": 1, "memory_mb": 256, "virtualization": "process", "service": "u/web", **kw})  # type: ignore[arg-type]


FILTER_CASES = [
    ("labels: has all", Labels(), demand(needs=("gpu", "cam")), cand("n", labels=("cam", "gpu", "x")), None),
    ("labels: lacks one", Labels(), demand(needs=("gpu", "cam")), cand("n", labels=("cam",)), "lacks label gpu"),
    ("labels: none needed", Labels(), demand(), cand("n"), None),
    ("geo: within", Geo(), demand(near=((48.137, 11.575, 50.0),)), cand("n", location=GARCHING), None),
    ("geo: too far", Geo(), demand(near=((48.137, 11.575, 50.0),)), cand("n", location=BERLIN),
     "504 km away > 50 km"),
    ("geo: unknown location", Geo(), demand(near=((48.137, 11.575, 50.0),)), cand("n"), "location unknown"),
    ("geo: no constraint", Geo(), demand(), cand("n"), None),
    ("anti-affinity: free", AntiAffinity(), demand(), cand("n", services={"u/db": 1}), None),
    ("anti-affinity: taken", AntiAffinity(), demand(), cand("n", services={"u/web": 1}),
     "already runs a replica of web"),
    ("anti-affinity soft: taken", AntiAffinity(hard=False), demand(), cand("n", services={"u/web": 1}), None),
    ("first-fit: skipped", FirstFit(("n",)), demand(), cand("n"), "skipped by first-fit"),
    ("least-loaded filters nothing", LeastLoaded(), demand(), cand("n"), None),
    ("bin-pack filters nothing", BinPack(), demand(), cand("n"), None),
]
EXTENSION_POINTS = [  # (plugin, filters, scores, normalizes): what each built-in implements
    (Labels(), True, False, False), (Geo(), True, True, False), (AntiAffinity(), True, True, False),
    (FirstFit(), True, True, True), (LeastLoaded(), False, True, False), (BinPack(), False, True, False),
]


@pytest.mark.parametrize(("plugin", "filters", "scores", "normalizes"), EXTENSION_POINTS,
                         ids=[p[0].name for p in EXTENSION_POINTS])
def test_each_plugin_is_at_the_extension_points_it_implements(plugin: object, filters: bool, scores: bool,
                                                              normalizes: bool) -> None:
    """Filter, score and normalize are separate Protocols, told apart with isinstance (no getattr)."""
    assert (isinstance(plugin, FilterPlugin), isinstance(plugin, ScorePlugin), isinstance(plugin, Normalizer)) \
        == (filters, scores, normalizes)
    profile = Profile((Weighted(plugin),))  # type: ignore[arg-type]
    assert (plugin in profile.filters, plugin in [p for p, _ in profile.scorers]) == (filters, scores)
    assert (id(plugin) in profile.normalizers) == normalizes
    smaller = profile.sampling(10)
    assert smaller.sample == 10
    assert smaller.plugins == profile.plugins
    assert profile.sampling(10) is smaller, "made once per size, not per decision"
    assert profile.sampling(profile.sample) is profile


def test_a_plugin_with_neither_filter_nor_score_is_refused() -> None:
    class Nothing:
        name = "nothing"

    with pytest.raises(ValueError, match="implements neither filter nor score"):
        Profile((Weighted(Nothing()),))  # type: ignore[arg-type]


@pytest.mark.parametrize(("plugin", "dem", "candidate", "reason"), [c[1:] for c in FILTER_CASES],
                         ids=[c[0] for c in FILTER_CASES])
def test_filters(plugin, dem: Demand, candidate: Candidate, reason: str | None) -> None:  # type: ignore[no-untyped-def]
    """Each plugin keeps or rejects a candidate with a reason people can read (one that does not filter
    keeps every candidate)."""
    assert (plugin.filter(dem, candidate) if isinstance(plugin, FilterPlugin) else None) == reason


CHOICE_CASES = [
    ("least-loaded spreads", LeastLoaded(), demand(), [cand("full", cpu=1, mem=300), cand("empty")], "empty"),
    ("bin-pack packs", BinPack(), demand(), [cand("full", cpu=1.5, mem=300), cand("empty")], "full"),
    ("geo prefers the closest", Geo(), demand(near=((48.137, 11.575, 600.0),)),
     [cand("berlin", location=BERLIN), cand("garching", location=GARCHING)], "garching"),
    ("soft anti-affinity prefers fewer replicas", AntiAffinity(hard=False), demand(),
     [cand("two", services={"u/web": 2}), cand("one", services={"u/web": 1})], "one"),
    ("first-fit takes the first name", FirstFit(), demand(), [cand("w2"), cand("w1"), cand("w3")], "w1"),
]


@pytest.mark.parametrize(("plugin", "dem", "candidates", "winner"), [c[1:] for c in CHOICE_CASES],
                         ids=[c[0] for c in CHOICE_CASES])
def test_scores_pick(plugin, dem: Demand, candidates: list[Candidate], winner: str) -> None:  # type: ignore[no-untyped-def]
    """Alone in a profile, each scoring plugin picks the candidate it should."""
    decision = place(dem, candidates, Profile((Weighted(plugin),)), "node")
    assert decision.choice is not None
    assert decision.choice.id == winner


FIT_CASES = [
    ("gpu missing", demand(gpus=1), cand("n"), "gpus 0 < 1"),
    ("gpu present", demand(gpus=1), cand("n", gpus=2), None),
    ("arch mismatch", demand(arch=("arm64",)), cand("n"), "architecture amd64 not in arm64"),
    ("arch match", demand(arch=("arm64", "amd64")), cand("n"), None),
]


@pytest.mark.parametrize(("dem", "candidate", "reason"), [c[1:] for c in FIT_CASES], ids=[c[0] for c in FIT_CASES])
def test_fit_gpu_and_architecture(dem: Demand, candidate: Candidate, reason: str | None) -> None:
    """Resource fit covers GPUs and architectures too."""
    decision = place(dem, [candidate], Profile(()), "node")
    assert decision.reasons.get("n") == reason


def test_weights_decide_between_plugins() -> None:
    """Weights trade plugins off: bin-pack outweighed by least-loaded, and the other way round."""
    candidates = [cand("full", cpu=1.5, mem=300), cand("empty")]
    spread = Profile((Weighted(LeastLoaded(), 3), Weighted(BinPack(), 1)))
    pack = Profile((Weighted(LeastLoaded(), 1), Weighted(BinPack(), 3)))
    assert place(demand(), candidates, spread, "node").choice.id == "empty"  # type: ignore[union-attr]
    assert place(demand(), candidates, pack, "node").choice.id == "full"  # type: ignore[union-attr]


def test_reservation_spreads_a_burst() -> None:
    """Reserving after each decision makes hard anti-affinity put three replicas on three nodes."""
    prof = Profile((Weighted(LeastLoaded()), Weighted(AntiAffinity())))
    candidates = {c.id: c for c in (cand("a"), cand("b"), cand("c"))}
    chosen = []
    for _ in range(3):
        decision = place(demand(), list(candidates.values()), prof, "node")
        assert decision.choice is not None
        chosen.append(decision.choice.id)
        candidates[decision.choice.id] = reserve(decision.choice, demand())
    assert sorted(chosen) == ["a", "b", "c"]
    assert place(demand(), list(candidates.values()), prof, "node").why_not().count("already runs") == 3


def test_distance() -> None:
    """Haversine: Munich to Berlin is about 504 km."""
    assert round(distance_km((48.137, 11.575), (52.520, 13.405))) == 504


# ---- profiles ----------------------------------------------------------------------------------


def test_profile_from_spec_and_file(tmp_path: Path) -> None:
    """A spec string and a TOML file both build weighted plugins, with arguments."""
    built = profile.load(make_manager(), "least-loaded,anti-affinity=2.5")
    assert [(w.plugin.name, w.weight) for w in built.plugins] == [("least-loaded", 1.0), ("anti-affinity", 2.5)]
    path = tmp_path / "p.toml"
    path.write_text('[[plugins]]\nname = "bin-pack"\nweight = 2\n\n'
                    '[[plugins]]\nname = "anti-affinity"\nargs = { hard = false }\n')
    built = profile.load(make_manager(), path=path)
    assert built.names == ["bin-pack", "anti-affinity"]
    assert built.plugins[1].plugin.hard is False  # type: ignore[attr-defined]


PROFILE_ERRORS = [
    ("unknown plugin", "least-loaded,nosuch", "no scheduler plugin named 'nosuch'"),
    ("bad weight", "least-loaded=heavy", "plugins[0].weight: 'heavy' is not a number"),
    ("zero weight", "least-loaded=0", "plugins[0].weight: expected a positive number"),
    ("empty", " , ", "names no scheduler plugin"),
]


@pytest.mark.parametrize(("spec", "message"), [c[1:] for c in PROFILE_ERRORS], ids=[c[0] for c in PROFILE_ERRORS])
def test_profile_spec_errors(spec: str, message: str) -> None:
    """Bad --scheduler specs stop startup with the culprit named."""
    with pytest.raises((profile.ProfileError, PluginError), match=message.replace("[", r"\[").replace("]", r"\]")):
        profile.load(make_manager(), spec)


FILE_ERRORS = [
    ("not toml", "plugins = [", "Invalid value"),
    ("no plugins", "x = 1", "unknown key 'x'"),
    ("empty list", "plugins = []", "at least one"),
    ("unknown key", '[[plugins]]\nname = "geo"\ncolour = "red"', r"plugins\[0\].colour: unknown key"),
    ("no name", "[[plugins]]\nweight = 1", r"plugins\[0\].name: expected a plugin name"),
    ("bad args", '[[plugins]]\nname = "anti-affinity"\nargs = { hard = "yes" }', "hard = true|false"),
    ("args not a table", '[[plugins]]\nname = "geo"\nargs = 3', r"plugins\[0\].args: expected a table"),
]


@pytest.mark.parametrize(("text", "message"), [c[1:] for c in FILE_ERRORS], ids=[c[0] for c in FILE_ERRORS])
def test_profile_file_errors(tmp_path: Path, text: str, message: str) -> None:
    """Bad profile files stop startup with the culprit named."""
    path = tmp_path / "p.toml"
    path.write_text(text)
    with pytest.raises(profile.ProfileError, match=message):
        profile.load(make_manager(), path=path)


LATENCY_CASES = [
    ("close enough", demand(latency=(("t", 20.0),), targets={"t": (0.0, 0.0, 0.0, 0.1)}),
     cand("n", coord=(3.0, 4.0, 0.0, 0.1)), None),
    ("too far", demand(latency=(("t", 4.0),), targets={"t": (0.0, 0.0, 0.0, 0.1)}),
     cand("n", coord=(3.0, 4.0, 0.0, 0.1)), "~5.0 ms to t > 4 ms"),
    ("target unknown", demand(latency=(("t", 4.0),)), cand("n", coord=(3.0, 4.0, 0.0, 0.1)),
     "latency target t unknown"),
    ("candidate unmeasured", demand(latency=(("t", 4.0),), targets={"t": (0.0, 0.0, 0.0, 0.1)}), cand("n"),
     "no latency measurements yet"),
    ("the target itself", demand(latency=(("n", 0.001),)), cand("n"), None),
    ("no constraint", demand(), cand("n"), None),
]


@pytest.mark.parametrize(("dem", "candidate", "reason"), [c[1:] for c in LATENCY_CASES],
                         ids=[c[0] for c in LATENCY_CASES])
def test_latency_filter(dem: Demand, candidate: Candidate, reason: str | None) -> None:
    """Estimated RTT from Vivaldi coordinates against the SLA's threshold."""
    assert Latency().filter(dem, candidate) == reason


def test_latency_prefers_the_nearest() -> None:
    """Among candidates within the threshold, the nearest to the target wins."""
    dem = demand(latency=(("t", 50.0),), targets={"t": (0.0, 0.0, 0.0, 0.1)})
    near, far = cand("near", coord=(1.0, 0.0, 0.0, 0.1)), cand("far", coord=(30.0, 0.0, 0.0, 0.1))
    assert place(dem, [far, near], Profile((Weighted(Latency()),)), "node").choice.id == "near"  # type: ignore[union-attr]
