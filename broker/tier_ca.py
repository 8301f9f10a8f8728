"""A tier's CA on disk and the broker listeners it secures: TLS everywhere, plain TCP only on loopback.

``<data-dir>/ca/`` (the root) or ``<data-dir>/cluster-ca/`` (a cluster: ``oak root`` and ``oak cluster``
share ``~/.oak`` by default) holds the tier's CA (``ca.pem``, ``ca.key``) and its broker's server
certificate (``server.pem``: the certificate, then the chain a worker needs to reach the root's CA;
``server.key``), made afresh at every start. A cluster keeps its CA as the root signed it in
``tls/ca-cross.pem``, beside its own login.
"""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass, replace
from pathlib import Path

import psutil
from cryptography import x509

from broker import ca
from broker.identity import SERVICE, USER
from broker.server import Listeners
from services.common.private import write_private

CA_DIR, CLUSTER_CA_DIR = "ca", "cluster-ca"


def local_hosts(listen: str) -> tuple[str, ...]:
    """The names and addresses this machine may be reached by, for its broker's server certificate."""
    addresses = {a.address.split("%")[0] for nics in psutil.net_if_addrs().values() for a in nics
                 if a.family in (socket.AF_INET, socket.AF_INET6)}
    names = {"localhost", socket.gethostname(), socket.getfqdn()}
    if listen not in ("", "0.0.0.0", "::"):
        names.add(listen)
    return tuple(sorted(names | addresses))


@dataclass(frozen=True)
class TierCa:
    """A tier's CA: the authority that signs its children, the fleet's CA they pin, and the chain."""

    directory: Path
    authority: ca.Authority
    fleet_ca: str  # PEM of the root's CA (at the root: the authority itself)
    chain: tuple[x509.Certificate, ...] = ()  # between a server certificate of this CA and the fleet's CA

    @classmethod
    def root(cls, data_dir: Path) -> TierCa:
        """The root's CA, made on first start."""
        authority = ca.load_or_create(data_dir / CA_DIR, "Oakling root CA", below=1)  # the clusters' CAs
        return cls(data_dir / CA_DIR, authority, ca.cert_pem(authority.cert).decode())

    @classmethod
    def cluster(cls, data_dir: Path, name: str) -> TierCa:
        """A cluster's own CA, made on first start (the root signs it when the cluster joins)."""
        directory = data_dir / CLUSTER_CA_DIR
        return cls(directory, ca.load_or_create(directory, ca.cluster_ca_name(name)), "")

    def joined(self, fleet_ca: Path, cross: Path) -> TierCa:
        """This cluster's CA once the root has signed it (*cross*) and given the fleet's CA (*fleet_ca*)."""
        return replace(self, fleet_ca=fleet_ca.read_text(), chain=tuple(ca.load_certs(cross.read_bytes())))

    @property
    def cafile(self) -> Path:
        """The CA certificate client certificates are checked against (this tier's own: no other's)."""
        return self.directory / "ca.pem"

    @property
    def fingerprint(self) -> str:
        """The fleet CA's fingerprint: what join commands pin."""
        return ca.fingerprint(ca.load_certs(self.fleet_ca)[0])

    def discovery(self) -> bytes:
        """The retained ``oak/join/ca`` document newcomers check before joining."""
        return json.dumps({"ca": self.fleet_ca, "chain": [ca.cert_pem(c).decode() for c in self.chain]}).encode()

    def write_crl(self, serials: list[int]) -> Path:
        """The revocation list of this CA (``crl.pem``), naming *serials*; its path."""
        path = self.directory / "crl.pem"
        write_private(path, self.authority.revocation_list(serials).decode())
        return path

    def listeners(self, wanted: Listeners, revoked: list[int], plain_loopback: bool = False,
                  plain_port: int = 0) -> Listeners:
        """*wanted* (host, port, websockets) secured: TLS on its port, with a fresh server certificate and
        the revocation list of the *revoked* serials; plain TCP on loopback, for this tier's services (and
        users, with *plain_loopback*, on *plain_port*)."""
        crlfile = self.write_crl(revoked)
        certfile, keyfile = self.directory / "server.pem", self.directory / "server.key"
        chain, key = self.authority.server_chain(ca.common_name(self.authority.cert) + " broker", self.chain,
                                                 local_hosts(wanted.host))
        write_private(keyfile, key.decode())
        write_private(certfile, chain.decode())
        return replace(wanted, port=plain_port if plain_loopback else 0, tls_port=wanted.port,
                       certfile=str(certfile), keyfile=str(keyfile), cafile=str(self.cafile), plain_host="127.0.0.1",
                       crlfile=str(crlfile),
                       plain_admits=frozenset({SERVICE, USER} if plain_loopback else {SERVICE}))
