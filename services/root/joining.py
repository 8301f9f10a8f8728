"""Who may be part of the fleet, at the root: join tokens (``tokens/create``; clusters get the workers'
ones, uses are counted) and revocation of clusters and workers.

Tokens for clusters stay at the root, whose desk checks them. Tokens for workers are sent, hashed, to
every cluster as retained ``oak/clusters/<c>/down/tokens`` (again whenever one is made or used, and
when a cluster joins); a cluster reports each use on ``up/tokens/used``. A worker is revoked by its
cluster, which the root asks on ``down/cmd/revoke``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from broker import ca
from broker.credentials import Credentials
from broker.identity import CLUSTER, Identity
from broker.join import Issuer
from broker.tokens import JoinTokens
from services.common import channels
from services.common.inbox import Received
from services.common.mqtt import BrokerUrl, MqttSession

log = logging.getLogger(__name__)



class RootJoining:
    """The root's join tokens, and how their join commands read."""

    def __init__(self, tokens: JoinTokens, session: MqttSession, clusters: Callable[[], list[str]],
                 root: BrokerUrl, fingerprint: str | None, revoke: Callable[[str], Awaitable[bool]],
                 issuer: Issuer | None = None) -> None:
        self.issuer = issuer  # the root's CA, which also signs users' certificates
        self.tokens = tokens
        self.session = session
        self.clusters = clusters  # the usernames that exist
        self.root = root
        self.fingerprint = fingerprint
        self._revoke = revoke  # refuse a username from now on and disconnect it (RunningBroker.revoke)

    async def user_certificate(self, credentials: Credentials, username: str, csr: str) -> dict[str, Any]:
        """A certificate for user *username*'s key (ValueError for a bad request): it logs the user in
        without a password, and replaces any earlier one."""
        if self.issuer is None:
            raise ValueError("this root runs no CA (its broker is not oak's)")
        cert = self.issuer.authority.issue(ca.requested_key(csr), username, days=self.issuer.days)
        await credentials.certify(username, cert.serial_number, cert.not_valid_after_utc.timestamp())
        return {"cert": ca.cert_pem(cert).decode(), "ca": self.issuer.fleet_ca, "port": self.issuer.port}

    async def revoke_cluster(self, name: str) -> bool:
        """Refuse cluster *name* from now on and disconnect it (the root then moves its instances)."""
        return await self._revoke(Identity(CLUSTER, name).username)

    def revoke_node(self, cluster: str, node: str) -> None:
        """Ask *cluster* to refuse its worker *node* from now on and disconnect it (and move its instances)."""
        self.session.send(channels.CLUSTER_COMMAND, {"node": node}, cluster=cluster, verb="revoke")

    async def create(self, for_cluster: bool, ttl: float, uses: int | None) -> dict[str, Any]:
        """A new token and the command that joins with it (ValueError for bad limits)."""
        token, record = await self.tokens.create("cluster" if for_cluster else "node", ttl, uses)
        pin = f" --ca-fingerprint {self.fingerprint}" if self.fingerprint else ""
        if for_cluster:
            command = (f"CLUSTER_NAME=<name> CLUSTER_LOCATION=<lat,lon> oak cluster --root {self.root.host}:"
                       f"{self.root.port} --root-join-token {token}{pin}")
        else:
            command = (f"oak worker --cluster <cluster address>:10003 --name <name> --join-token {token}{pin}\n"
                       f"NodeEngine -n 6000 -p 10100 -a <cluster address> --join-token {token}{pin}")
            self.publish()
        return {"token": token, "kind": record.kind, "expires": record.expires, "uses": record.uses,
                "fingerprint": self.fingerprint, "command": command}

    def publish(self, cluster: str | None = None) -> None:
        """Send the workers' tokens (hashed) to *cluster*, or to every cluster."""
        body = channels.CLUSTER_TOKENS.encode({"tokens": self.tokens.of_kind("node")}, "root")
        names = [cluster] if cluster else [Identity.of(u).name for u in self.clusters()
                                           if Identity.of(u).kind == CLUSTER]
        for name in names:
            self.session.send(channels.CLUSTER_TOKENS, body, cluster=name)

    async def used(self, use: Received[dict[str, Any]]) -> None:
        """A cluster let a worker join with one of the tokens: count the use, tell every cluster."""
        token_id = (use.body or {}).get("id")
        if token_id is None:
            log.warning("dropped a token use without an id from cluster %s", use.sender)
            return
        if await self.tokens.used(str(token_id)):
            self.publish()
