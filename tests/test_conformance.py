"""Oakling's own runtimes pass the conformance suite its runtime plugin authors get
(plugins/conformance.py): the process runtime, containers on runc with the busybox test image, and VMs on
QEMU with the test kernel and initramfs (tests/vmimages.py), the behaviours given as kernel arguments."""

from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from plugins.conformance import RuntimeConformance
from plugins.runtimes.container import ContainerRuntime
from plugins.runtimes.process import ProcessRuntime
from plugins.runtimes.vm import VmRuntime
from services.common.plugin_api import LaunchSpec, Runtime
from tests import vmimages

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


@pytest.fixture(scope="module")
def vm_images(tmp_path_factory: pytest.TempPathFactory) -> vmimages.TestVm:
    """The Debian kernel and the test initramfs (skips, saying why, when VMs cannot boot here)."""
    return vmimages.prepare(tmp_path_factory.mktemp("vm"))


@pytest.mark.timeout(180)
class TestVmRuntime(RuntimeConformance):
    """VMs on QEMU booting the test kernel and initramfs; each behaviour is a kernel command line."""

    failure_code = None  # a guest that panics ends QEMU; the reason says kernel panic, there is no code
    failure_output = ("out",)  # the console is the log: boot messages, then what the guest printed
    timeout = 120.0
    log_wait = 10.0
    BEHAVIOURS = {
        "fail": ["oak.say=out", "oak.then=panic"],
        "succeed": ["oak.then=poweroff"],
        "run": [],  # the test init idles once booted
        "ignore-term": [],  # QEMU is stopped by the runtime whatever the guest does
        "missing": [],  # with a kernel that does not exist (make_spec)
        "allocate": [],
    }

    @pytest.fixture(autouse=True)
    def _kernel(self, vm_images: vmimages.TestVm) -> None:
        self.code = str(vm_images.bundle)

    def make_runtime(self, data_dir: Path) -> Runtime:
        return VmRuntime(str(data_dir))

    def command(self, behaviour: str) -> list[str]:
        return ["quiet", *self.BEHAVIOURS[behaviour]]

    def make_spec(self, tmp_path: Path, behaviour: str, memory_mb: int = 0) -> LaunchSpec:
        spec = super().make_spec(tmp_path, behaviour, memory_mb or 128)
        return replace(spec, code="/nonexistent/oak-kernel") if behaviour == "missing" else spec
