"""Files handed to a Linux guest in its initramfs: how the vm runtime gives a VM its secrets.

The kernel unpacks every archive of its initramfs in turn, so files reach the guest by appending one
more archive to the image's own: the original bytes, NULs up to a 4-byte boundary, then an
uncompressed ``newc`` cpio with the files (and their parent directories), owned by root, mode 0400.
They are in the guest's root file system before its ``/init`` runs (a guest that switches to another
root must copy them first). The format is the kernel's (Documentation/driver-api/early-userspace/
buffer-format.rst): a header of hex fields per entry, a few lines, so no library is needed for it.
"""

from __future__ import annotations

import stat
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

from services.common.private import write_mode

FILE_MODE = stat.S_IFREG | 0o400
DIR_MODE = stat.S_IFDIR | 0o755


class Cpio:
    """A ``newc`` cpio archive, the format the kernel unpacks an initramfs from."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.ino = 1

    def add(self, name: str, mode: int, data: bytes = b"") -> None:
        """Add an entry (a file, a directory or a symlink whose target is *data*) owned by root."""
        fields = (self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name) + 1, 0)
        header = b"070701" + b"".join(b"%08X" % f for f in fields) + name.encode() + b"\0"
        self.parts += [header, b"\0" * (-len(header) % 4), data, b"\0" * (-len(data) % 4)]
        self.ino += 1

    def bytes(self) -> bytes:
        """The archive, with its trailer."""
        self.add("TRAILER!!!", 0)
        return b"".join(self.parts)


def archive(files: Iterable[tuple[bytes, str]]) -> bytes:
    """A cpio holding each ``(data, absolute path in the guest)``, with the directories above them."""
    out = Cpio()
    made: set[str] = set()
    for data, target in files:
        path = PurePosixPath(target)
        for parent in reversed(path.parents[:-1]):  # "/run", then "/run/secrets"; never "/" itself
            name = str(parent).lstrip("/")
            if name not in made:
                out.add(name, DIR_MODE)
                made.add(name)
        out.add(str(path).lstrip("/"), FILE_MODE, data)
    return out.bytes()


def with_files(initrd: Path | None, files: Iterable[tuple[Path, str]], out: Path) -> Path:
    """Write to *out* the image *initrd* (none: only the files) followed by an archive of *files*
    (``(file on the worker, path in the guest)``), readable by its owner alone; return *out*."""
    appended = archive((Path(source).read_bytes(), target) for source, target in files)
    image = initrd.read_bytes() if initrd is not None else b""
    write_mode(out, image + b"\0" * (-len(image) % 4) + appended, 0o600)
    return out
