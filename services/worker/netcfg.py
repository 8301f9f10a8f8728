"""``netcfg.json``: the worker's network settings, in the seed guide's format, validated."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

DEFAULT_PATH = Path("/etc/netmanager/netcfg.json")
DirectRouting = Literal["off", "on", "auto"]  # DirectRouting false, true, "auto"
KNOWN = {"NodePublicAddress", "NodePublicPort", "ClusterUrl", "ClusterMqttPort", "DefaultInterface", "Debug",
         "DirectRouting", "PublicIPNetworking", "MqttCert", "MqttKey", "JoinToken", "CaFingerprint"}
FINGERPRINT = re.compile(r"sha256:[0-9a-f]{64}")


class NetConfigError(ValueError):
    """netcfg.json is unreadable or a field is wrong; the message names the field."""


def _port(raw: dict[str, Any], name: str, default: int) -> int:
    value = raw.get(name, default)
    try:
        port = int(value)
    except (TypeError, ValueError):
        raise NetConfigError(f"{name}: {value!r} is not a port number") from None
    if isinstance(value, bool) or not 1 <= port <= 65535:
        raise NetConfigError(f"{name}: {value!r} is not a port number (1-65535)")
    return port


def _flag(raw: dict[str, Any], name: str) -> bool:
    value = raw.get(name, False)
    if not isinstance(value, bool):
        raise NetConfigError(f"{name}: expected true or false")
    return value


def _text(raw: dict[str, Any], name: str, default: str) -> str:
    value = raw.get(name, default)
    if not isinstance(value, str):
        raise NetConfigError(f"{name}: expected a string, got {type(value).__name__}")
    return value


def _fingerprint(raw: dict[str, Any]) -> str:
    value = _text(raw, "CaFingerprint", "").strip().lower()
    if value and not FINGERPRINT.fullmatch(value):
        raise NetConfigError(f"CaFingerprint: expected sha256: and 64 hex digits (from `oak token create`), "
                             f"got {value!r}")
    return value


def _direct_routing(raw: dict[str, Any]) -> DirectRouting:
    value = raw.get("DirectRouting", "auto")
    if isinstance(value, bool):
        return "on" if value else "off"
    if value != "auto":
        raise NetConfigError(f'DirectRouting: expected true, false or "auto", got {value!r}')
    return "auto"


@dataclass(frozen=True)
class NetConfig:
    """The fields of netcfg.json (Oakestra's names) with their defaults."""

    node_public_address: str = "auto"
    node_public_port: int = 50103
    cluster_url: str = "localhost"
    cluster_mqtt_port: int = 10003
    default_interface: str = ""
    debug: bool = False
    direct_routing: DirectRouting = "auto"  # reach workers on the same link without VXLAN: off, on, or once probed
    join_token: str = ""  # the token a first join presents (JoinToken)
    ca_fingerprint: str = ""  # the fleet CA a first join pins (CaFingerprint)

    @classmethod
    def parse(cls, raw: Any) -> NetConfig:
        """Validate a decoded netcfg.json."""
        if not isinstance(raw, dict):
            raise NetConfigError("netcfg.json must hold a JSON object")
        unknown = sorted(set(raw) - KNOWN)
        if unknown:
            raise NetConfigError(f"{unknown[0]}: unknown field (known: {', '.join(sorted(KNOWN))})")
        return cls(
            node_public_address=_text(raw, "NodePublicAddress", "auto") or "auto",
            node_public_port=_port(raw, "NodePublicPort", 50103),
            cluster_url=_text(raw, "ClusterUrl", "localhost") or "localhost",
            cluster_mqtt_port=_port(raw, "ClusterMqttPort", 10003),
            default_interface=_text(raw, "DefaultInterface", ""),
            debug=_flag(raw, "Debug"),
            direct_routing=_direct_routing(raw),
            join_token=_text(raw, "JoinToken", ""),
            ca_fingerprint=_fingerprint(raw),
        )

    @classmethod
    def load(cls, path: Path) -> NetConfig:
        """Read and validate *path*; a missing file gives the defaults."""
        if not path.exists():
            return cls()
        try:
            return cls.parse(json.loads(path.read_text()))
        except (ValueError, UnicodeDecodeError) as exc:
            if isinstance(exc, NetConfigError):
                raise NetConfigError(f"{path}: {exc}") from None
            raise NetConfigError(f"{path}: not valid JSON: {exc}") from None
