"""Payments when things break: a killed daemon, two daemons racing, etcd down, the chain down.

All on real processes: anvil with the contracts, etcd (embedded or
external), ``twistd snetd``, grpcio clients.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from snet_daemon._proto import example_service_pb2 as pb
from snet_daemon._proto import example_service_pb2_grpc as pb_grpc
from snet_daemon._proto.escrow import control_service_pb2 as cpb
from snet_daemon._proto.escrow import control_service_pb2_grpc as cpb_grpc
from snet_daemon.payments import signatures as sig
from tests.conftest import make_channel
from tests.support.chain import ANVIL_MISSING, PROVIDER, Chain, anvil_available, chain  # noqa: F401 (fixture)
from tests.support.daemon import Daemon
from tests.support.etcd import EtcdServer, etcd_factory  # noqa: F401 (fixture)
from tests.support.ipfs import IpfsServer, ipfs  # noqa: F401 (fixture)
from tests.support.paid import (  # noqa: F401 (fixture)
    PRICE,
    Deployment,
    deployed,
    group_on_one_etcd,
    open_channel,
    two_daemons,
    wait_ready,
)
from tests.support.tcpproxy import TcpProxy
from tests.support.upstream import Upstream

pytestmark = pytest.mark.skipif(not anvil_available(), reason=ANVIL_MISSING)


def paid_echo(deployment: Deployment, address: str, channel_id: int, amount: int, nonce: int = 0) -> pb.EchoReply:
    channel = make_channel(address)
    try:
        reply: pb.EchoReply = pb_grpc.EchoStub(channel).Unary(
            pb.EchoRequest(), metadata=deployment.payment(channel_id, nonce, amount), timeout=15
        )
        return reply
    finally:
        channel.close()


def signed_amount(deployment: Deployment, address: str, channel_id: int) -> int:
    channel = make_channel(address)
    try:
        return int.from_bytes(deployment.state(channel, channel_id).current_signed_amount, "big")
    finally:
        channel.close()


def state_of(deployment: Deployment, address: str, channel_id: int) -> tuple[int, int]:
    """``GetChannelState`` as snet-sdk asks it before a paid call: (current nonce, signed amount)."""
    channel = make_channel(address)
    try:
        reply = deployment.state(channel, channel_id)
    finally:
        channel.close()
    return int.from_bytes(reply.current_nonce, "big"), int.from_bytes(reply.current_signed_amount, "big")


class Treasurer:
    """The provider's side of the claim flow, as ``snet treasurer`` drives it."""

    def __init__(self, deployment: Deployment) -> None:
        self.deployment = deployment
        self.key = bytes.fromhex(PROVIDER.private_key[2:])
        self.mpe = sig.checksum(deployment.mpe)

    def start_claim(self, address: str, channel_id: int, nonce: int) -> cpb.PaymentReply:
        request = cpb.StartClaimRequest(
            mpe_address=self.mpe,
            channel_id=channel_id.to_bytes(32, "big"),
            signature=sig.sign(sig.start_claim(self.deployment.mpe, channel_id, nonce), self.key),
        )
        with make_channel(address) as channel:
            reply: cpb.PaymentReply = cpb_grpc.ProviderControlServiceStub(channel).StartClaim(request, timeout=15)
        return reply

    def in_progress(self, address: str) -> list[cpb.PaymentReply]:
        block = self.deployment.chain.block_number()
        request = cpb.GetPaymentsListRequest(
            mpe_address=self.mpe,
            current_block=block,
            signature=sig.sign(sig.list_in_progress(self.deployment.mpe, block), self.key),
        )
        with make_channel(address) as channel:
            reply = cpb_grpc.ProviderControlServiceStub(channel).GetListInProgress(request, timeout=15)
        return list(reply.payments)

    def claim_on_chain(self, claim: cpb.PaymentReply, *, sendback: bool = False) -> None:
        """``channelClaim`` with the payment the daemon handed over (what claim-all sends).

        ``sendback``: the rest of the channel goes back to its sender (MPE
        sets its value and expiration to 0), as when closing it."""
        amount = int.from_bytes(claim.signed_amount, "big")
        signature = claim.signature
        self.deployment.chain.transact(
            self.deployment.chain.mpe,
            "channelClaim",
            int.from_bytes(claim.channel_id, "big"),
            amount,
            amount,
            signature[64],
            signature[:32],
            signature[32:64],
            sendback,
            sender=PROVIDER.address,
        )


def retry_until(action: Callable[[], object], timeout: float, allowed: set[grpc.StatusCode]) -> tuple[float, list[str]]:
    """Repeat ``action`` until it succeeds; return the time it took and the errors seen."""
    start = time.monotonic()
    seen: list[str] = []
    while True:
        try:
            action()
            return time.monotonic() - start, seen
        except grpc.RpcError as error:
            seen.append(f"{error.code().name}: {error.details()}")
            assert error.code() in allowed, seen
            assert time.monotonic() - start < timeout, seen
            time.sleep(0.25)


def test_daemon_killed_mid_call_frees_the_channel_within_the_lease(
    chain: Chain,  # noqa: F811
    ipfs: IpfsServer,  # noqa: F811
    upstream: Upstream,
    tmp_path: Path,
) -> None:
    """SIGKILL during a paid call: after a restart the channel is usable within the lease TTL.

    The payment was recorded before the call reached the service, so it stays
    (the service may have done the work); the next call pays the next amount.
    """
    with deployed(chain, ipfs, upstream, tmp_path) as deployment:
        channel_id = open_channel(chain)
        daemon = deployment.daemon
        upstream.record.reset()
        channel = make_channel(daemon.address)
        future = pb_grpc.EchoStub(channel).Unary.future(
            pb.EchoRequest(delay_ms=10_000), metadata=deployment.payment(channel_id, 0, PRICE), timeout=30
        )
        deadline = time.monotonic() + 10
        while not upstream.record.metadata and time.monotonic() < deadline:
            time.sleep(0.05)
        assert upstream.record.metadata, "the paid call never reached the service"
        assert daemon.process is not None
        os.kill(daemon.process.pid, signal.SIGKILL)
        daemon.process.wait(10)
        assert future.exception(timeout=10) is not None
        channel.close()

        daemon.start()
        wait_ready(daemon)
        assert signed_amount(deployment, daemon.address, channel_id) == PRICE
        took, errors = retry_until(
            lambda: paid_echo(deployment, daemon.address, channel_id, 2 * PRICE),
            timeout=20,
            allowed={grpc.StatusCode.FAILED_PRECONDITION},
        )
        assert took < 15, (took, errors)
        assert signed_amount(deployment, daemon.address, channel_id) == 2 * PRICE


def test_two_daemons_on_one_etcd_never_accept_more_than_signed(
    chain: Chain,  # noqa: F811
    ipfs: IpfsServer,  # noqa: F811
    upstream: Upstream,
    two_daemons: list[Daemon],  # noqa: F811
) -> None:
    """The same payments sent to two daemons at once are each accepted at most once."""
    daemons = two_daemons
    deployment = Deployment.for_group(chain, ipfs, upstream, daemons)
    channel_id = open_channel(chain, amount=10_000)
    upstream.record.reset()
    accepted = 0
    attempts = 0
    with ThreadPoolExecutor(8) as pool:
        while accepted < 10 and attempts < 60:
            attempts += 1
            amount = (accepted + 1) * PRICE
            futures = [
                pool.submit(paid_echo, deployment, d.address, channel_id, amount) for d in daemons for _ in range(2)
            ]
            wins = 0
            for future in futures:
                try:
                    future.result()
                    wins += 1
                except grpc.RpcError as error:
                    assert error.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNAUTHENTICATED)
            assert wins <= 1, f"payment of {amount} accepted {wins} times"
            accepted += wins
    assert accepted == 10
    assert len(upstream.record.metadata) == accepted  # nothing served unpaid
    for daemon in daemons:
        assert signed_amount(deployment, daemon.address, channel_id) == accepted * PRICE


def test_call_cut_short_while_its_payment_is_written_is_not_charged(
    chain: Chain,  # noqa: F811
    ipfs: IpfsServer,  # noqa: F811
    upstream: Upstream,
    tmp_path: Path,
    etcd_factory: Callable[[], EtcdServer],  # noqa: F811
) -> None:
    """etcd's replies come 0.1 s late, so a call with a 30 ms deadline ends while its payment
    write (applied) is on its way back.  The payment is given back once the reply comes, and no
    hold is left behind: another daemon of the group takes the channel at once afterwards."""
    etcd = etcd_factory().start()
    host, port = etcd.url.removeprefix("http://").split(":")
    proxy = TcpProxy((host, int(port)))
    proxy.reply_delay = 0.1
    proxy.up()
    try:
        with group_on_one_etcd(chain, ipfs, upstream, tmp_path, proxy.url) as daemons:
            deployment = Deployment(chain, ipfs, upstream, daemons[0], proxy.url)
            channel_id = open_channel(chain, amount=10_000)
            paid_echo(deployment, daemons[0].address, channel_id, PRICE)  # served and charged
            upstream.record.reset()
            channel = make_channel(daemons[0].address)
            try:
                for _ in range(3):
                    with pytest.raises(grpc.RpcError) as info:
                        pb_grpc.EchoStub(channel).Unary(
                            pb.EchoRequest(), metadata=deployment.payment(channel_id, 0, 2 * PRICE), timeout=0.03
                        )
                    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                    time.sleep(0.5)  # the write's reply, then the refund's
            finally:
                channel.close()
            assert upstream.record.metadata == []  # none of them was served ...
            assert signed_amount(deployment, daemons[1].address, channel_id) == PRICE  # ... nor charged
            started = time.monotonic()
            paid_echo(deployment, daemons[1].address, channel_id, 2 * PRICE)
            assert time.monotonic() - started < 2  # no hold of daemon 0 left on the channel
            assert signed_amount(deployment, daemons[1].address, channel_id) == 2 * PRICE
    finally:
        proxy.down()


def test_client_alternating_between_two_daemons_pays_call_after_call(
    chain: Chain,  # noqa: F811
    ipfs: IpfsServer,  # noqa: F811
    upstream: Upstream,
    two_daemons: list[Daemon],  # noqa: F811
) -> None:
    """Calls that alternate between the daemons of a group all go through.

    Each daemon's finished call leaves its hold lingering briefly; the other
    daemon waits for it instead of refusing the client's next call.
    """
    daemons = two_daemons
    deployment = Deployment.for_group(chain, ipfs, upstream, daemons)
    channel_id = open_channel(chain, amount=10_000)
    upstream.record.reset()
    calls = 8
    for k in range(1, calls + 1):
        paid_echo(deployment, daemons[k % 2].address, channel_id, k * PRICE)
    assert len(upstream.record.metadata) == calls
    for daemon in daemons:
        assert signed_amount(deployment, daemon.address, channel_id) == calls * PRICE


def test_daemon_with_an_older_chain_view_after_a_claim_landed_through_another(
    chain: Chain,  # noqa: F811
    ipfs: IpfsServer,  # noqa: F811
    upstream: Upstream,
    two_daemons: list[Daemon],  # noqa: F811
) -> None:
    """A claim started through daemon 1 lands on chain and daemon 1 forgets it.  Daemon 2, whose
    cached view of the channel predates the claim, still answers GetChannelState (snet-sdk asks
    it before every paid call), takes the next payment and starts the next claim."""
    daemons = two_daemons
    deployment = Deployment.for_group(chain, ipfs, upstream, daemons)
    one, two = (daemon.address for daemon in daemons)
    treasurer = Treasurer(deployment)
    channel_id = open_channel(chain)
    paid_echo(deployment, two, channel_id, PRICE)  # daemon 2 caches the channel at nonce 0
    treasurer.claim_on_chain(treasurer.start_claim(one, channel_id, 0))
    assert chain.channel(channel_id)[0] == 1
    assert treasurer.in_progress(one) == []  # daemon 1 sees the claim landed and forgets it
    assert state_of(deployment, two, channel_id) == (1, 0)
    paid_echo(deployment, two, channel_id, PRICE, nonce=1)
    claim = treasurer.start_claim(two, channel_id, 1)
    assert (int.from_bytes(claim.channel_nonce, "big"), int.from_bytes(claim.signed_amount, "big")) == (1, PRICE)


def test_payments_are_refused_once_a_sendback_claim_landed(
    chain: Chain,  # noqa: F811
    ipfs: IpfsServer,  # noqa: F811
    upstream: Upstream,
    two_daemons: list[Daemon],  # noqa: F811
) -> None:
    """A claim started through daemon 1 lands with isSendback: the channel is emptied (value and
    expiration 0) and moves to nonce 1.  Both daemons cached the channel before; within a block
    poll interval (200 ms here) they refuse payments under nonce 1, and GetChannelState shows the
    claim landed.  (They accepted those payments for the channel TTL, 300 s: calls served unpaid.)"""
    daemons = two_daemons
    deployment = Deployment.for_group(chain, ipfs, upstream, daemons)
    one, two = (daemon.address for daemon in daemons)
    treasurer = Treasurer(deployment)
    channel_id = open_channel(chain)
    paid_echo(deployment, two, channel_id, PRICE)  # daemon 2 caches the channel at nonce 0
    claim = treasurer.start_claim(one, channel_id, 0)  # daemon 1 reads it too, before the landing
    treasurer.claim_on_chain(claim, sendback=True)
    nonce, *_, value, expiration = chain.channel(channel_id)
    assert (nonce, value, expiration) == (1, 0, 0)
    time.sleep(0.3)
    upstream.record.reset()
    for address in (one, two):
        channel = make_channel(address)
        try:
            state = deployment.state(channel, channel_id)
        finally:
            channel.close()
        assert (int.from_bytes(state.current_nonce, "big"), state.old_nonce_signed_amount) == (1, b"")
        with pytest.raises(grpc.RpcError) as refused:
            paid_echo(deployment, address, channel_id, PRICE, nonce=1)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "payment channel is near to be expired, expiration time: 0," in (refused.value.details() or "")
    assert upstream.record.metadata == []


def test_etcd_down_refuses_paid_calls_and_recovers(
    chain: Chain,  # noqa: F811
    ipfs: IpfsServer,  # noqa: F811
    upstream: Upstream,
    tmp_path: Path,
    etcd_factory: Callable[[], EtcdServer],  # noqa: F811
) -> None:
    """With etcd stopped, paid calls get UNAVAILABLE and never reach the service; they resume when it is back."""
    etcd = etcd_factory().start()
    with deployed(chain, ipfs, upstream, tmp_path, etcd_endpoint=etcd.url) as deployment:
        address = deployment.daemon.address
        channel_id = open_channel(chain)
        paid_echo(deployment, address, channel_id, PRICE)
        etcd.stop()
        upstream.record.reset()
        with pytest.raises(grpc.RpcError) as info:
            paid_echo(deployment, address, channel_id, 2 * PRICE)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert upstream.record.metadata == []
        etcd.start()
        retry_until(
            lambda: paid_echo(deployment, address, channel_id, 2 * PRICE),
            timeout=20,
            allowed={grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.FAILED_PRECONDITION},
        )
        assert signed_amount(deployment, address, channel_id) == 2 * PRICE


@pytest.fixture
def rpc_proxy(chain: Chain) -> Iterator[TcpProxy]:  # noqa: F811
    host, port = chain.url.split("//", 1)[1].rsplit(":", 1)
    proxy = TcpProxy((host, int(port))).up()
    yield proxy
    proxy.down()


def test_chain_rpc_down_serves_known_channels_within_the_staleness_bound(
    chain: Chain,  # noqa: F811
    ipfs: IpfsServer,  # noqa: F811
    upstream: Upstream,
    tmp_path: Path,
    rpc_proxy: TcpProxy,
) -> None:
    """RPC down: known channels keep working until the cached block is too old; unknown ones are refused,
    and GetChannelState says the node is unavailable rather than "channel is not found"."""
    extra = {"ethereum_json_rpc_http_endpoint": rpc_proxy.url, "block_max_age": "4s"}
    with deployed(chain, ipfs, upstream, tmp_path, extra=extra) as deployment:
        address = deployment.daemon.address
        known = open_channel(chain)
        paid_echo(deployment, address, known, PRICE)
        rpc_proxy.down()
        unknown = open_channel(chain)  # opened while the daemon cannot see the chain
        paid_echo(deployment, address, known, 2 * PRICE)
        with pytest.raises(grpc.RpcError) as info:
            paid_echo(deployment, address, unknown, PRICE)
        assert info.value.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE)
        channel = make_channel(address)
        try:
            with pytest.raises(grpc.RpcError) as info:
                deployment.state(channel, unknown)
        finally:
            channel.close()
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()
        assert "from the Ethereum node" in info.value.details(), info.value.details()
        time.sleep(5)  # the cached block number is now older than block_max_age
        with pytest.raises(grpc.RpcError) as info:
            paid_echo(deployment, address, known, 3 * PRICE)
        assert "block" in info.value.details()
        rpc_proxy.up()
        retry_until(
            lambda: paid_echo(deployment, address, unknown, PRICE),
            timeout=20,
            allowed={grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED},
        )
        paid_echo(deployment, address, known, 3 * PRICE)
