"""Oakling's certificate authorities, with the ``cryptography`` package: keys, requests, certificates.

Trust follows the tiers (docs/security.md says why):

* the **root** runs the fleet's CA (``<data-dir>/ca/ca.pem``, key ``ca.key`` mode 0600). It signs its
  broker's server certificate, each cluster's client certificate (the bridge's login) and users'
  certificates;
* each **cluster** has a CA of its own for its workers. Its key signs two certificates of itself: one
  self-signed, the only anchor its broker trusts (so a worker of another cluster is a stranger here),
  and one signed by the root (``ca-cross.pem``), sent with the broker's server certificate so that a
  worker, which pins the root's CA, can verify the cluster it joins;
* a certificate's common name is the MQTT identity (``cluster.c1``, ``node.w1``, ``alice``).

Keys are ECDSA P-256: small, and fast to make and check on a Raspberry Pi.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from services.common.private import private_dir, write_private

CERT_DAYS = 90  # a machine's or user's certificate; renewed before it ends
CA_DAYS = 3650
BACKDATE = datetime.timedelta(minutes=5)  # clocks of small devices drift

PrivateKey = ec.EllipticCurvePrivateKey


class CertificateError(ValueError):
    """A request or certificate that cannot be used."""


def new_key() -> PrivateKey:
    """A fresh private key."""
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: PrivateKey) -> bytes:
    """The key in PEM (unencrypted: it lives in a 0600 file)."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def load_key(pem: bytes) -> PrivateKey:
    """A key written by :func:`key_pem`."""
    key = serialization.load_pem_private_key(pem, None)
    if not isinstance(key, PrivateKey):
        raise CertificateError("not an EC private key")
    return key


def cert_pem(*certs: x509.Certificate) -> bytes:
    """Certificates in PEM, one after the other (a chain: leaf first)."""
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def load_certs(pem: bytes | str) -> list[x509.Certificate]:
    """Every certificate in *pem*; :class:`CertificateError` when there is none or one is damaged."""
    try:
        certs = x509.load_pem_x509_certificates(pem.encode() if isinstance(pem, str) else pem)
    except ValueError as exc:
        raise CertificateError(f"not a PEM certificate: {exc}") from None
    return certs


def fingerprint(cert: x509.Certificate) -> str:
    """``sha256:<hex>`` of the certificate's DER bytes: what join commands pin."""
    return "sha256:" + hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def common_name(cert: x509.Certificate) -> str:
    """The certificate's subject common name (the MQTT identity)."""
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else ""


def request(key: PrivateKey, name: str) -> bytes:
    """A certificate signing request for *name*, in PEM."""
    csr = x509.CertificateSigningRequestBuilder().subject_name(_name(name)).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM)


def requested_key(pem: str) -> ec.EllipticCurvePublicKey:
    """The public key of a signing request, once its signature proves the requester holds the key."""
    try:
        csr = x509.load_pem_x509_csr(pem.encode())
    except ValueError as exc:
        raise CertificateError(f"not a PEM signing request: {exc}") from None
    if not csr.is_signature_valid:
        raise CertificateError("the signing request's signature does not verify")
    key = csr.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise CertificateError("the signing request must hold an EC key")
    return key


def cluster_ca_name(cluster: str) -> str:
    """The common name of cluster *cluster*'s own CA (the same in its self-signed and its root-signed form)."""
    return f"Oakling cluster {cluster} CA"


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Oakling"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


@dataclass(frozen=True)
class Authority:
    """A CA: its certificate (as the tier presents it) and key."""

    cert: x509.Certificate
    key: PrivateKey

    @classmethod
    def create(cls, name: str, below: int = 0) -> Authority:
        """A new self-signed CA, with *below* levels of CAs allowed under it (the root's: 1, the clusters')."""
        key = new_key()
        return cls(_build(_name(name), key.public_key(), _name(name), key, CA_DAYS, ca=True, below=below), key)

    def issue(self, public_key: ec.EllipticCurvePublicKey, name: str, *, days: float = CERT_DAYS,
              client: bool = True, server: bool = False, hosts: tuple[str, ...] = ()) -> x509.Certificate:
        """A leaf certificate for *name*: a client login, or a broker's server certificate for *hosts*."""
        return _build(_name(name), public_key, self.cert.subject, self.key, days, client=client, server=server,
                      hosts=hosts)

    def cross_sign(self, ca_key: ec.EllipticCurvePublicKey, name: str) -> x509.Certificate:
        """A certificate that makes the CA *name* (key *ca_key*) an intermediate under this one."""
        return _build(_name(name), ca_key, self.cert.subject, self.key, CA_DAYS, ca=True)

    def server_chain(self, name: str, chain: tuple[x509.Certificate, ...] = (),
                     hosts: tuple[str, ...] = ()) -> tuple[bytes, bytes]:
        """A fresh server certificate for this tier's broker (followed by *chain*) and its key, in PEM.

        *hosts* (names and addresses) are its subject alternative names, for clients that check them
        (mosquitto_sub, openssl); oak's own clients check the CA only.
        """
        key = new_key()
        cert = self.issue(key.public_key(), name, client=False, server=True, hosts=hosts)
        return cert_pem(cert, *chain), key_pem(key)

    @property
    def fingerprint(self) -> str:
        """The CA certificate's fingerprint."""
        return fingerprint(self.cert)

    def revocation_list(self, serials: list[int]) -> bytes:
        """A CRL (PEM) of this CA naming *serials*, valid a year (mosquitto reads it at start)."""
        now = _now()
        builder = (x509.CertificateRevocationListBuilder().issuer_name(self.cert.subject)
                   .last_update(now - BACKDATE).next_update(now + datetime.timedelta(days=365)))
        for serial in serials:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now - BACKDATE).build())
        return builder.sign(self.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def _build(subject: x509.Name, public_key: ec.EllipticCurvePublicKey, issuer: x509.Name, signer: PrivateKey,
           days: float, *, ca: bool = False, client: bool = False, server: bool = False,
           hosts: tuple[str, ...] = (), below: int = 0) -> x509.Certificate:
    now = _now()
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - BACKDATE).not_valid_after(now + datetime.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=below if ca else None), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                                        critical=True)
    else:
        usages = [u for u, wanted in ((ExtendedKeyUsageOID.CLIENT_AUTH, client),
                                      (ExtendedKeyUsageOID.SERVER_AUTH, server)) if wanted]
        builder = (builder.add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False),
                                         critical=True)
                   .add_extension(x509.ExtendedKeyUsage(usages), critical=False))
    if hosts:
        builder = builder.add_extension(x509.SubjectAlternativeName([_general_name(h) for h in hosts]),
                                        critical=False)
    return builder.sign(signer, hashes.SHA256())


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def load_or_create(directory: Path, name: str, below: int = 0) -> Authority:
    """The CA kept in *directory* (``ca.pem``, ``ca.key``), made on first use (see :meth:`Authority.create`)."""
    private_dir(directory)
    cert_path, key_path = directory / "ca.pem", directory / "ca.key"
    if cert_path.exists() and key_path.exists():
        return Authority(load_certs(cert_path.read_bytes())[0], load_key(key_path.read_bytes()))
    authority = Authority.create(name, below)
    write_private(key_path, key_pem(authority.key).decode())
    write_private(cert_path, cert_pem(authority.cert).decode())
    return authority
