"""The real snet-sdk 6.0.0 and snet-cli 3.1.1 against a real daemon on a local chain.

Metadata goes through the Registry and the test IPFS server, exactly as the
clients find it in production; the clients run unmodified in their own
venv, each in a subprocess with a fresh HOME.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.chain import ANVIL_MISSING, CLIENT, PROVIDER, SIGNER, Chain, anvil_available, chain  # noqa: F401 (fixture)
from tests.support.clients import Cli, clients_available, proto_tarball, run_sdk
from tests.support.ipfs import IpfsServer, ipfs  # noqa: F401 (fixture)
from tests.support.paid import PRICE, Deployment, deployed, open_channel
from tests.support.upstream import Upstream

pytestmark = [
    pytest.mark.skipif(not anvil_available(), reason=ANVIL_MISSING),
    pytest.mark.skipif(not clients_available(), reason="snet-sdk/snet-cli are not installed (run scripts/setup)"),
]

SDK_PAID_CALLS = """
from snet.sdk.payment_strategies.paidcall_payment_strategy import PaidCallPaymentStrategy
client = sdk.create_service_client(
    "test-org", "test-service", group_name="default_group", payment_strategy=PaidCallPaymentStrategy()
)
values = [client.call_rpc("add", "Numbers", a=float(i), b=2.0).value for i in range({calls})]
print("RESULT " + json.dumps(values))
"""


@pytest.fixture
def deployment(chain: Chain, ipfs: IpfsServer, upstream: Upstream, tmp_path: Path) -> Iterator[Deployment]:  # noqa: F811
    """A paid deployment whose metadata carries the service's protos."""
    with deployed(chain, ipfs, upstream, tmp_path / "daemon", api_source=proto_tarball()) as running:
        yield running


def sdk_paid_calls(deployment: Deployment, home: Path, calls: int) -> list[float]:
    values: list[float] = run_sdk(
        SDK_PAID_CALLS.format(calls=calls), home, deployment.chain, deployment.ipfs, CLIENT, SIGNER
    )
    return values


def onchain_nonce(chain: Chain, channel_id: int) -> int:  # noqa: F811
    return int(chain.channel(channel_id)[0])


def test_sdk_paid_calls(deployment: Deployment, tmp_path: Path) -> None:
    """snet-sdk's PaidCallPaymentStrategy makes paid calls; the daemon records what it signed."""
    channel_id = open_channel(deployment.chain)
    assert sdk_paid_calls(deployment, tmp_path / "sdk", 3) == [2.0, 3.0, 4.0]
    from tests.conftest import make_channel

    channel = make_channel(deployment.daemon.address)
    state = deployment.state(channel, channel_id)
    channel.close()
    assert int.from_bytes(state.current_signed_amount, "big") == 3 * PRICE


def test_cli_call_state_and_treasurer_claim_lands_on_chain(deployment: Deployment, tmp_path: Path) -> None:
    """snet-cli: channel state, call, treasurer print-unclaimed and claim-all; SDK calls on the new nonce."""
    chain_ = deployment.chain
    channel_id = open_channel(chain_)
    endpoint = deployment.daemon.address
    assert sdk_paid_calls(deployment, tmp_path / "sdk1", 2) == [2.0, 3.0]

    client = Cli(tmp_path / "cli-client", chain_, deployment.ipfs)
    client.identity("client", SIGNER)  # the key that signed the SDK's payments
    state = client.run("client", "get-channel-state", str(channel_id), endpoint).stdout
    assert re.search(r"current_nonce\s+=\s+0", state), state
    assert re.search(rf"current_signed_amount_in_cogs\s+=\s+{2 * PRICE}\b", state), state

    called = client.run(
        "client",
        "call",
        "test-org",
        "test-service",
        "default_group",
        "add",
        '{"a": 20, "b": 22}',
        "--channel-id",
        str(channel_id),
        "--endpoint",
        endpoint,
        "-y",
    ).stdout
    assert "value: 42" in called, called

    treasurer = Cli(tmp_path / "cli-provider", chain_, deployment.ipfs)
    treasurer.identity("provider", PROVIDER)
    unclaimed = treasurer.run("treasurer", "print-unclaimed", "--endpoint", endpoint).stdout
    assert re.search(rf"^{channel_id}\s+0\s+", unclaimed, re.MULTILINE), unclaimed

    balance_before = int(chain_.mpe.functions.balances(PROVIDER.address).call())
    treasurer.run("treasurer", "claim-all", "--endpoint", endpoint, "-y")
    assert onchain_nonce(chain_, channel_id) == 1
    balance_after = int(chain_.mpe.functions.balances(PROVIDER.address).call())
    assert balance_after - balance_before == 3 * PRICE

    # Clients continue on the new nonce, from zero.
    assert sdk_paid_calls(deployment, tmp_path / "sdk2", 2) == [2.0, 3.0]
    state = client.run("client", "get-channel-state", str(channel_id), endpoint).stdout
    assert re.search(r"current_nonce\s+=\s+1", state), state
    assert re.search(rf"current_signed_amount_in_cogs\s+=\s+{2 * PRICE}\b", state), state
    unclaimed = treasurer.run("treasurer", "print-unclaimed", "--endpoint", endpoint).stdout
    assert re.search(rf"^{channel_id}\s+1\s+", unclaimed, re.MULTILINE), unclaimed
