"""A whole paid deployment for end-to-end tests.

anvil with the real MPE/Registry/token contracts, organization and service
metadata published through the test IPFS server and registered in the
Registry, the example service, and ``twistd snetd`` with payments on, its
storage in an embedded etcd (or an external one) — exactly how a provider
runs the daemon, on loopback.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from snet_daemon._proto.escrow import state_service_pb2 as spb
from snet_daemon._proto.escrow import state_service_pb2_grpc as spb_grpc
from snet_daemon.payments import signatures as sig
from tests.support.chain import (
    CLIENT,
    GROUP_NAME,
    ORG_ID,
    SERVICE_ID,
    SIGNER,
    Chain,
    org_metadata,
    service_metadata,
)
from tests.support.daemon import Daemon
from tests.support.etcd import EtcdServer
from tests.support.ipfs import IpfsServer
from tests.support.ports import free_port
from tests.support.upstream import Upstream

PRICE = 10
TOKEN_SECRET = "a-test-secret-that-is-at-least-32-bytes-long"


@dataclass
class Deployment:
    """Everything of one paid deployment."""

    chain: Chain
    ipfs: IpfsServer
    upstream: Upstream
    daemon: Daemon
    etcd_endpoint: str | None

    @classmethod
    def for_group(cls, chain: Chain, ipfs: IpfsServer, upstream: Upstream, daemons: list[Daemon]) -> Deployment:
        """The deployment of a :func:`group_on_one_etcd`, seen through its first daemon."""
        endpoint: str = daemons[0].config["payment_channel_storage_client"]["endpoints"][0]
        return cls(chain, ipfs, upstream, daemons[0], endpoint)

    @property
    def mpe(self) -> bytes:
        return sig.address_bytes(self.chain.mpe.address)

    def state(self, channel: grpc.Channel, channel_id: int, key: str = SIGNER.private_key) -> spb.ChannelStateReply:
        """``GetChannelState`` as a client asks it."""
        block = self.chain.block_number()
        signature = sig.sign(sig.channel_state_request(self.mpe, channel_id, block), bytes.fromhex(key[2:]))
        stub = spb_grpc.PaymentChannelStateServiceStub(channel)
        request = spb.ChannelStateRequest(
            channel_id=channel_id.to_bytes(4, "big"), signature=signature, current_block=block
        )
        reply: spb.ChannelStateReply = stub.GetChannelState(request, timeout=10)
        return reply

    def payment(self, channel_id: int, nonce: int, amount: int, key: str = SIGNER.private_key) -> list[tuple[str, Any]]:
        """The metadata of an escrow payment (as snet-sdk sends it)."""
        signature = sig.sign(sig.mpe_claim(self.mpe, channel_id, nonce, amount), bytes.fromhex(key[2:]))
        return [
            ("snet-payment-type", "escrow"),
            ("snet-payment-channel-id", str(channel_id)),
            ("snet-payment-channel-nonce", str(nonce)),
            ("snet-payment-channel-amount", str(amount)),
            ("snet-payment-channel-signature-bin", signature),
        ]


def daemon_config(
    chain: Chain,
    ipfs: IpfsServer,
    upstream: Upstream,
    workdir: Path,
    *,
    etcd_endpoint: str | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The config of a paying daemon on the local chain."""
    config: dict[str, Any] = {
        "blockchain_enabled": True,
        "blockchain_network_selected": "local",
        "ethereum_json_rpc_http_endpoint": chain.url,
        "registry_address_key": chain.registry.address,
        "ipfs_endpoint": ipfs.url,
        "organization_id": ORG_ID,
        "service_id": SERVICE_ID,
        "daemon_group_name": GROUP_NAME,
        "service_endpoint": upstream.endpoint,
        "token_secret_key": TOKEN_SECRET,
        "block_poll_interval": "200ms",
        "metadata_refresh_interval": "1s",
        "payment_channel_storage_type": "etcd",
        "log": {"level": "info"},
    }
    if etcd_endpoint is not None:
        config["payment_channel_storage_client"] = {"endpoints": [etcd_endpoint]}
    else:
        client_port, peer_port = free_port(), free_port()
        config["payment_channel_storage_server"] = {
            "enabled": True,
            "client_port": client_port,
            "peer_port": peer_port,
            "cluster": f"storage-1=http://127.0.0.1:{peer_port}",
            "data_dir": str(workdir / "etcd-data"),
            "log_outputs": [str(workdir / "etcd.log")],
        }
    config.update(extra or {})
    return config


def publish(
    chain: Chain,
    ipfs: IpfsServer,
    daemon_port: int,
    *,
    etcd_endpoints: tuple[str, ...] = (),
    price: int = PRICE,
    api_source: bytes | None = None,
    free_call_signer: str | None = None,
) -> None:
    """Register the org and the service, with the daemon as the service's endpoint.

    ``api_source``, a tarball of the service's protos, is published too when
    given (the real clients compile it); ``free_call_signer`` replaces the
    sample metadata's ``free_call_signer_address``.
    """
    service = service_metadata(
        mpe_address=chain.mpe.address, price=price, endpoints=(f"http://127.0.0.1:{daemon_port}",)
    )
    if free_call_signer is not None:
        service["groups"][0]["free_call_signer_address"] = free_call_signer
    if api_source is not None:
        service["service_api_source"] = "ipfs://" + ipfs.add(api_source)
    chain.publish(ipfs, org=org_metadata(endpoints=etcd_endpoints), service=service)


def open_channel(chain: Chain, amount: int = 1_000) -> int:
    """A channel from the test client to the provider, signed by the client's signer."""
    return chain.open_channel(sender=CLIENT.address, signer=SIGNER.address, amount=amount)


def wait_ready(daemon: Daemon, timeout: float = 30.0) -> dict[str, Any]:
    """Wait until the heartbeat says the daemon can take payments."""
    deadline = time.monotonic() + timeout
    report: dict[str, Any] = {}
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"http://{daemon.address}/heartbeat", timeout=5) as reply:
            report = json.loads(reply.read())
        if report.get("ready"):
            return report
        time.sleep(0.2)
    raise AssertionError(f"daemon not ready: {report}\n{daemon.log_tail()}")


@contextmanager
def deployed(
    chain: Chain,
    ipfs: IpfsServer,
    upstream: Upstream,
    workdir: Path,
    *,
    api_source: bytes | None = None,
    etcd_endpoint: str | None = None,
    extra: dict[str, Any] | None = None,
    free_call_signer: str | None = None,
) -> Iterator[Deployment]:
    """A running paid deployment (the daemon stopped on exit)."""
    workdir.mkdir(parents=True, exist_ok=True)
    daemon = Daemon(workdir, {})
    daemon.config.update(daemon_config(chain, ipfs, upstream, workdir, etcd_endpoint=etcd_endpoint, extra=extra))
    daemon.config_path.write_text(json.dumps(daemon.config))
    if etcd_endpoint is not None:
        endpoints: tuple[str, ...] = (etcd_endpoint,)
    else:
        endpoints = (f"http://127.0.0.1:{daemon.config['payment_channel_storage_server']['client_port']}",)
    publish(
        chain, ipfs, daemon.port, etcd_endpoints=endpoints, api_source=api_source, free_call_signer=free_call_signer
    )
    daemon.start()
    try:
        wait_ready(daemon)
        yield Deployment(chain, ipfs, upstream, daemon, etcd_endpoint)
    finally:
        daemon.stop()


@contextmanager
def group_on_one_etcd(
    chain: Chain, ipfs: IpfsServer, upstream: Upstream, workdir: Path, etcd_endpoint: str, count: int = 2
) -> Iterator[list[Daemon]]:
    """``count`` running daemons of one payment group sharing the etcd at ``etcd_endpoint``.

    The group's metadata names that etcd and the first daemon's endpoint.
    All are stopped on exit.
    """
    daemons = []
    for index in range(count):
        home = workdir / f"daemon-{index}"
        home.mkdir(parents=True)
        daemon = Daemon(home, {})
        daemon.config.update(daemon_config(chain, ipfs, upstream, home, etcd_endpoint=etcd_endpoint))
        daemon.config_path.write_text(json.dumps(daemon.config))
        daemons.append(daemon)
    publish(chain, ipfs, daemons[0].port, etcd_endpoints=(etcd_endpoint,))
    try:
        for daemon in daemons:
            daemon.start()
            wait_ready(daemon)
        yield daemons
    finally:
        for daemon in daemons:
            daemon.stop()


@pytest.fixture
def two_daemons(
    chain: Chain,
    ipfs: IpfsServer,
    upstream: Upstream,
    tmp_path: Path,
    etcd_factory: Callable[[], EtcdServer],
) -> Iterator[list[Daemon]]:
    """Two daemons of one group sharing an external etcd (``chain``, ``ipfs``, ``upstream`` and
    ``etcd_factory`` are the test module's fixtures)."""
    etcd = etcd_factory().start()
    with group_on_one_etcd(chain, ipfs, upstream, tmp_path, etcd.url) as daemons:
        yield daemons
