"""Builds the login plugin (``mosquitto_login.c``) for the mosquitto a tier runs.

mosquitto has no setting that binds client ids to logins for more than one id per login, none that
slows down failed logins, and hashes every password on every connection; so oak brings a small plugin
and compiles it where mosquitto runs, once per version of its source, into the broker's directory.
Without a C compiler, mosquitto's plugin headers (Debian: ``mosquitto-dev``, ``libmosquitto-dev``) or OpenSSL's
(``libssl-dev``) the broker still runs on mosquitto's own password check, but any valid login may then
displace another client's session; oak says so loudly.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("mosquitto_login.c")
HEADERS = ("mosquitto_plugin.h", "mosquitto.h", "openssl/evp.h")
INCLUDE_DIRS = (Path("/usr/include"), Path("/usr/local/include"))


def _target(directory: Path) -> Path:
    """Where this version of the source builds to; builds of other versions are removed."""
    name = f"oak_login-{hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]}.so"
    for old in directory.glob("oak_login-*.so"):
        if old.name != name:
            old.unlink()
    return directory / name


async def build_plugin(directory: Path) -> Path | None:
    """The plugin's shared object in *directory*, built if needed; None (with a warning) if it cannot be."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    missing = [h for h in HEADERS if not any((include / h).exists() for include in INCLUDE_DIRS)]
    if compiler is None or missing:
        log.warning("CLIENT IDS NOT BOUND: building oak's mosquitto plugin needs a C compiler and %s "
                    "(Debian: apt-get install gcc mosquitto-dev libmosquitto-dev libssl-dev); until then a valid "
                    "login may take over another client's session on this broker", ", ".join(HEADERS))
        return None
    target = _target(directory)
    if target.exists():
        return target
    process = await asyncio.create_subprocess_exec(
        compiler, "-shared", "-fPIC", "-O2", "-o", str(target), str(SOURCE), "-lcrypto",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await process.communicate()
    if process.returncode != 0:
        target.unlink(missing_ok=True)
        log.warning("CLIENT IDS NOT BOUND: oak's mosquitto plugin did not build: %s",
                    output.decode(errors="replace").strip()[-500:])
        return None
    target.chmod(0o700)  # nothing of a tier's is anyone else's (mosquitto runs as oak's user)
    return target
