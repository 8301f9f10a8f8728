"""The ``psutil`` collector: what it says about this machine, and loading it by name."""

from __future__ import annotations

import platform
import socket

import psutil
import pytest

import plugins.collectors.psutil_basic as psutil_module
from plugins.collectors.psutil_basic import PsutilCollector
from services.common import plugins
from services.common.plugin_api import Collector


def test_info() -> None:
    collector = PsutilCollector()
    assert isinstance(collector, Collector)
    assert collector.name == "psutil"
    info = collector.info()
    assert {"cpu_cores", "memory_mb", "arch", "os", "kernel", "hostname"} <= set(info)
    assert info["cpu_cores"] == psutil.cpu_count()
    assert info["cpu_cores"] >= 1
    assert isinstance(info["memory_mb"], int)
    assert info["memory_mb"] == psutil.virtual_memory().total // 2**20
    assert info["memory_mb"] > 0
    expected_arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
    assert info["arch"] == expected_arch
    assert info["arch"] not in ("x86_64", "aarch64")
    assert info["os"] == platform.system().lower() == "linux"
    assert info["kernel"] == platform.release()
    assert info["hostname"] == socket.gethostname()


def test_sample() -> None:
    collector = PsutilCollector()
    collector.sample()
    sample = collector.sample()
    assert {"cpu_percent", "memory_free_mb", "memory_percent", "disk_percent"} <= set(sample)
    assert 0.0 <= sample["cpu_percent"] <= 100.0 * (psutil.cpu_count() or 1)
    assert isinstance(sample["memory_free_mb"], float)
    assert 0 < sample["memory_free_mb"] <= collector.info()["memory_mb"] + 1
    assert 0.0 <= sample["memory_percent"] <= 100.0
    assert 0.0 <= sample["disk_percent"] <= 100.0


def test_loads_by_name_through_entry_points(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OAK_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    if "psutil" not in plugins.available("collector"):
        pytest.skip("entry points not installed (run: pip install -e .)")
    assert isinstance(plugins.load_collector(plugins.make_manager(), "psutil"), PsutilCollector)


def test_loads_when_registered_directly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OAK_DISABLE_PLUGIN_AUTOLOAD", "1")
    pm = plugins.make_manager()
    pm.register(psutil_module)
    assert isinstance(plugins.load_collector(pm, "psutil"), PsutilCollector)
    assert pm.hook.oak_make_collector(name="other") is None
