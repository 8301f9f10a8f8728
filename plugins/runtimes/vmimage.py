"""What a VM boots: the SLA's ``code`` (and ``arch``) turned into a kernel and an optional initrd.

As in Oakestra, ``code`` is one entry or several separated by commas, paired by position with the
SLA's ``arch`` list (``["amd64", "arm64"]``); the worker takes the entry of its own architecture. An
entry is a local path, a ``file://`` URL or an ``http(s)://`` URL (fetched once into the worker's
cache), naming either a kernel image or a tar archive (plain or gzip/xz/bz2) holding ``kernel`` and,
optionally, ``initrd``. Unpacked archives are cached by content, so instances share them.
"""

from __future__ import annotations

import os
import platform
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from plugins.runtimes.download import digest, fetch

#: Go-style architecture names (as the SLA and the node info use them) of ``platform.machine()``.
ARCH = {"x86_64": "amd64", "aarch64": "arm64"}
MEMBERS = ("kernel", "initrd")


@dataclass(frozen=True)
class Boot:
    """The files QEMU boots."""

    kernel: Path
    initrd: Path | None = None


def host_arch() -> str:
    """This machine's architecture, Go style (``amd64``, ``arm64``)."""
    machine = platform.machine()
    return ARCH.get(machine, machine)


def pick(code: str, arch: tuple[str, ...], host: str) -> str:
    """The entry of *code* for architecture *host*; RuntimeError when there is none."""
    entries = [entry.strip() for entry in code.split(",")]
    if not arch:
        if len(entries) != 1:
            raise RuntimeError(f"code has {len(entries)} entries but the SLA gives no 'arch' to pair them with")
        return entries[0]
    if len(arch) != len(entries):
        raise RuntimeError(f"code has {len(entries)} entries for {len(arch)} architectures ({', '.join(arch)})")
    if host not in arch:
        raise RuntimeError(f"no kernel for {host} in code (it has {', '.join(arch)})")
    return entries[arch.index(host)]


def _unpack(archive: Path, into: Path) -> Boot:
    """Extract ``kernel`` and ``initrd`` (nothing else, regular files only) from *archive* into *into*."""
    found: dict[str, Path] = {}
    with tarfile.open(archive) as tar:
        for member in tar:
            name = os.path.normpath(member.name).lstrip("/")
            if name in MEMBERS and member.isfile() and name not in found:
                source = tar.extractfile(member)
                if source is not None:
                    with open(into / name, "wb") as out:
                        shutil.copyfileobj(source, out)
                    found[name] = into / name
    if "kernel" not in found:
        raise RuntimeError(f"code {archive}: the archive holds no 'kernel' file")
    return Boot(found["kernel"], found.get("initrd"))


def resolve(code: str, arch: tuple[str, ...], cache: Path) -> Boot:
    """The kernel (and initrd) this worker boots for *code*; RuntimeError with a readable reason."""
    path = fetch(pick(code, arch, host_arch()), cache)
    try:
        is_archive = tarfile.is_tarfile(path)
    except OSError as exc:
        raise RuntimeError(f"code {path}: {exc.strerror}") from None
    if not is_archive:
        return Boot(path)
    info = path.stat()
    unpacked = cache / "unpacked" / digest(str(path.resolve()), str(info.st_size), str(info.st_mtime_ns))
    if not (unpacked / "kernel").exists():
        unpacked.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(dir=unpacked.parent))
        try:
            _unpack(path, work)
            if unpacked.exists():  # another instance unpacked it meanwhile
                shutil.rmtree(work)
            else:
                os.replace(work, unpacked)
        except (OSError, tarfile.TarError) as exc:
            shutil.rmtree(work, ignore_errors=True)
            raise RuntimeError(f"code {path}: cannot unpack: {exc}") from None
        except RuntimeError:
            shutil.rmtree(work, ignore_errors=True)
            raise
    initrd = unpacked / "initrd"
    return Boot(unpacked / "kernel", initrd if initrd.exists() else None)
