"""Paid calls through a real daemon: anvil, real contracts, embedded etcd, grpcio.

The client side is done by hand here (our own signing, grpcio stubs), so
every rule can be poked; tests/test_real_clients.py does the same with the
real snet-sdk and snet-cli.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from snet_daemon._proto import example_service_pb2 as pb
from snet_daemon._proto import example_service_pb2_grpc as pb_grpc
from tests.conftest import make_channel
from tests.support.chain import ANVIL_MISSING, Chain, anvil_available, chain  # noqa: F401 (fixture)
from tests.support.ipfs import IpfsServer, ipfs  # noqa: F401 (fixture)
from tests.support.paid import PRICE, Deployment, deployed, open_channel, wait_ready
from tests.support.upstream import Upstream

pytestmark = pytest.mark.skipif(not anvil_available(), reason=ANVIL_MISSING)


@pytest.fixture
def deployment(chain: Chain, ipfs: IpfsServer, upstream: Upstream, tmp_path: Path) -> Iterator[Deployment]:  # noqa: F811
    """A paid deployment on the shared chain."""
    with deployed(chain, ipfs, upstream, tmp_path) as running:
        yield running


def test_paid_calls_and_channel_state(deployment: Deployment) -> None:
    """Paid calls go through; the channel state follows the accepted amounts."""
    channel_id = open_channel(deployment.chain)
    channel = make_channel(deployment.daemon.address)
    calc = pb_grpc.CalculatorStub(channel)
    state = deployment.state(channel, channel_id)
    assert int.from_bytes(state.current_nonce, "big") == 0
    assert state.current_signed_amount == b""
    for i in range(1, 4):
        reply = calc.add(pb.Numbers(a=i, b=1), metadata=deployment.payment(channel_id, 0, i * PRICE), timeout=10)
        assert reply.value == i + 1
    state = deployment.state(channel, channel_id)
    assert int.from_bytes(state.current_signed_amount, "big") == 3 * PRICE
    channel.close()


def test_service_receives_the_payers_address(deployment: Deployment) -> None:
    """The service gets snet-user-address (the channel's sender) with the call, and only that:
    one the client sent is dropped (services trust it to say who paid)."""
    from tests.support.chain import CLIENT

    channel_id = open_channel(deployment.chain)
    channel = make_channel(deployment.daemon.address)
    deployment.upstream.record.reset()
    spoofed = [*deployment.payment(channel_id, 0, PRICE), ("snet-user-address", "0x" + "ab" * 20)]
    pb_grpc.EchoStub(channel).Unary(pb.EchoRequest(), metadata=spoofed, timeout=10)
    seen = [value for key, value in deployment.upstream.record.metadata[-1] if key == "snet-user-address"]
    assert seen == [CLIENT.address]
    channel.close()


def test_unpaid_and_badly_paid_calls_are_refused(deployment: Deployment) -> None:
    """No payment, a wrong amount, a wrong nonce: refused with Go's codes; nothing reaches the service."""
    channel_id = open_channel(deployment.chain)
    channel = make_channel(deployment.daemon.address)
    calc = pb_grpc.CalculatorStub(channel)
    deployment.upstream.record.reset()
    with pytest.raises(grpc.RpcError) as info:
        calc.add(pb.Numbers(a=1, b=1), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "snet-payment-channel-id" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        calc.add(pb.Numbers(a=1, b=1), metadata=deployment.payment(channel_id, 0, PRICE + 1), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert info.value.details() == f"income {PRICE + 1} does not equal to price {PRICE}"
    with pytest.raises(grpc.RpcError) as info:
        calc.add(pb.Numbers(a=1, b=1), metadata=deployment.payment(channel_id, 5, PRICE), timeout=10)
    assert info.value.code().value[0] == 1000 or "nonce" in info.value.details()
    echo = pb_grpc.EchoStub(channel)
    with pytest.raises(grpc.RpcError):
        echo.Unary(pb.EchoRequest(), metadata=deployment.payment(channel_id + 99, 0, PRICE), timeout=10)
    assert deployment.upstream.record.metadata == []
    channel.close()


def test_failed_call_is_not_charged(deployment: Deployment) -> None:
    """A call the service fails costs nothing: the same amount pays the next call."""
    channel_id = open_channel(deployment.chain)
    channel = make_channel(deployment.daemon.address)
    echo = pb_grpc.EchoStub(channel)
    with pytest.raises(grpc.RpcError) as info:
        echo.Unary(
            pb.EchoRequest(fail_code=13, fail_message="boom"),
            metadata=deployment.payment(channel_id, 0, PRICE),
            timeout=10,
        )
    assert info.value.details() == "boom"
    assert deployment.state(channel, channel_id).current_signed_amount == b""
    echo.Unary(pb.EchoRequest(), metadata=deployment.payment(channel_id, 0, PRICE), timeout=10)
    assert int.from_bytes(deployment.state(channel, channel_id).current_signed_amount, "big") == PRICE
    channel.close()


def test_heartbeat_reports_payments_ready(deployment: Deployment) -> None:
    """The heartbeat is Online and ready, with the group's id in the daemon id."""
    report = wait_ready(deployment.daemon)
    assert report["status"] == "Online"
    assert report["blockchainEnabled"] is True
    assert report["problems"] == []
