"""Oakling's own runtimes pass the conformance suite its runtime plugin authors get
(plugins/conformance.py): the process runtime, and containers on runc, with the busybox test image."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from plugins.conformance import RuntimeConformance
from plugins.runtimes.container import ContainerRuntime
from plugins.runtimes.process import ProcessRuntime
from services.common.plugin_api import Runtime

pytestmark = pytest.mark.timeout(90)


class TestProcessRuntime(RuntimeConformance):
    """The process runtime; as root it also enforces memory limits (cgroups)."""

    limits_memory = os.geteuid() == 0 and shutil.which("unshare") is not None

    def make_runtime(self, data_dir: Path) -> Runtime:
        return ProcessRuntime(str(data_dir))


class TestContainerRuntimeOnRunc(RuntimeConformance):
    """OCI containers run by runc, from the busybox test image."""

    limits_memory = True

    @pytest.fixture(autouse=True)
    def _image(self, busybox_image: Path) -> None:
        if os.geteuid() != 0 or shutil.which("runc") is None:
            pytest.skip("containers need root and runc")
        self.code = str(busybox_image)

    def make_runtime(self, data_dir: Path) -> Runtime:
        return ContainerRuntime(str(data_dir), engine="runc")
