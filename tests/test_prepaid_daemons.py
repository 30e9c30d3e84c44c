"""Prepaid calls on real daemons: 64 calls in flight on one channel, two daemons, one etcd.

anvil with the contracts, an external etcd, two ``twistd snetd`` of one
payment group, grpcio clients signing as snet-sdk does.  Whatever the
interleaving, the used amount is exactly the price of the calls the service
answered, and never above the planned amount.
"""

from __future__ import annotations

from collections.abc import Callable

import grpc
import pytest

from snet_daemon._proto import example_service_pb2 as pb
from snet_daemon._proto import example_service_pb2_grpc as pb_grpc
from snet_daemon._proto.escrow import token_service_pb2 as tpb
from snet_daemon._proto.escrow import token_service_pb2_grpc as tpb_grpc
from snet_daemon.payments import signatures as sig
from tests.conftest import make_channel
from tests.support.chain import ANVIL_MISSING, SIGNER, Chain, anvil_available, chain  # noqa: F401 (fixture)
from tests.support.daemon import Daemon
from tests.support.etcd import EtcdServer, etcd_factory  # noqa: F401 (fixture)
from tests.support.ipfs import IpfsServer, ipfs  # noqa: F401 (fixture)
from tests.support.paid import PRICE, open_channel, two_daemons  # noqa: F401 (fixture)
from tests.support.upstream import Upstream

pytestmark = pytest.mark.skipif(not anvil_available(), reason=ANVIL_MISSING)

IN_FLIGHT = 64
SIGNER_KEY = bytes.fromhex(SIGNER.private_key[2:])


def get_token(chain: Chain, address: str, channel_id: int, amount: int, nonce: int = 0) -> tpb.TokenReply:  # noqa: F811
    """``TokenService/GetToken`` exactly as snet-sdk's concurrency manager asks it."""
    mpe = sig.address_bytes(chain.mpe.address)
    block = chain.block_number()
    claim = sig.sign(sig.mpe_claim(mpe, channel_id, nonce, amount), SIGNER_KEY)
    request = tpb.TokenRequest(
        channel_id=channel_id,
        current_nonce=nonce,
        signed_amount=amount,
        signature=sig.sign(sig.token_request(claim, block), SIGNER_KEY),
        current_block=block,
        claim_signature=claim,
    )
    channel = make_channel(address)
    try:
        reply: tpb.TokenReply = tpb_grpc.TokenServiceStub(channel).GetToken(request, timeout=10)
        return reply
    finally:
        channel.close()


def prepaid_metadata(channel_id: int, token: str) -> list[tuple[str, str | bytes]]:
    return [
        ("snet-payment-type", "prepaid-call"),
        ("snet-payment-channel-id", str(channel_id)),
        ("snet-payment-channel-nonce", "0"),
        ("snet-prepaid-auth-token-bin", token.encode()),
    ]


def calls_in_flight(
    daemons: list[Daemon], channel_id: int, token: str, failing: Callable[[int], bool] = lambda i: False
) -> tuple[int, list[str]]:
    """IN_FLIGHT calls at once, alternating between the daemons; (successes, refusals)."""
    channels = [make_channel(d.address) for d in daemons]
    try:
        futures = []
        for i in range(IN_FLIGHT):
            request = pb.EchoRequest(delay_ms=1500, fail_code=14 if failing(i) else 0, fail_message="service failed")
            stub = pb_grpc.EchoStub(channels[i % len(channels)])
            futures.append(stub.Unary.future(request, metadata=prepaid_metadata(channel_id, token), timeout=60))
        successes, refusals = 0, []
        for future in futures:
            try:
                future.result()
                successes += 1
            except grpc.RpcError as error:
                refusals.append(f"{error.code().name}: {error.details()}")
        return successes, refusals
    finally:
        for channel in channels:
            channel.close()


def test_64_calls_in_flight_on_two_daemons_never_use_more_than_planned(
    two_daemons: list[Daemon],  # noqa: F811
    chain: Chain,  # noqa: F811
    upstream: Upstream,
) -> None:
    """64 prepaid calls at once on one channel over two daemons: used == successes × price <= planned."""
    channel_id = open_channel(chain, amount=100_000)
    planned_calls = 48
    reply = get_token(chain, two_daemons[0].address, channel_id, planned_calls * PRICE)
    assert (reply.planned_amount, reply.used_amount) == (planned_calls * PRICE, 0)
    upstream.record.reset()
    successes, refusals = calls_in_flight(two_daemons, channel_id, reply.token)
    assert successes == planned_calls, refusals
    assert refusals == [f"RESOURCE_EXHAUSTED: Usage Exceeded on channel Id {channel_id}"] * (IN_FLIGHT - planned_calls)
    assert len(upstream.record.metadata) == successes  # nothing served unpaid
    for daemon in two_daemons:
        again = get_token(chain, daemon.address, channel_id, planned_calls * PRICE)
        assert (again.planned_amount, again.used_amount) == (planned_calls * PRICE, successes * PRICE)


def test_failed_calls_in_flight_are_refunded(
    two_daemons: list[Daemon],  # noqa: F811
    chain: Chain,  # noqa: F811
) -> None:
    """64 calls at once, a quarter failing in the service: used is the price of the successful ones."""
    channel_id = open_channel(chain, amount=100_000)
    reply = get_token(chain, two_daemons[1].address, channel_id, 100 * PRICE)
    successes, refusals = calls_in_flight(two_daemons, channel_id, reply.token, failing=lambda i: i % 4 == 0)
    assert successes == IN_FLIGHT * 3 // 4
    assert set(refusals) == {"UNAVAILABLE: service failed"}
    again = get_token(chain, two_daemons[0].address, channel_id, 100 * PRICE)
    assert (again.planned_amount, again.used_amount) == (100 * PRICE, successes * PRICE)
