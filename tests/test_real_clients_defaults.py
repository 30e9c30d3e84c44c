"""snet-sdk 6.0.0 with its defaults, and prepaid calls, against a real daemon.

The SDK's default strategy asks for a free-call token before every call,
makes the free calls, then switches to prepaid calls (``SNET_CONCURRENCY``
on); the explicit ``PrePaidPaymentStrategy`` signs for several calls at once
and runs them in parallel on one channel.  snet-cli's treasurer then claims
what the prepayments signed, on chain.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import make_channel
from tests.support.chain import ACCOUNTS, ANVIL_MISSING, CLIENT, PROVIDER, SIGNER, Chain, anvil_available, chain  # noqa: F401
from tests.support.clients import Cli, clients_available, proto_tarball, run_sdk
from tests.support.ipfs import IpfsServer, ipfs  # noqa: F401 (fixture)
from tests.support.paid import PRICE, Deployment, deployed, open_channel
from tests.support.upstream import Upstream

pytestmark = [
    pytest.mark.skipif(not anvil_available(), reason=ANVIL_MISSING),
    pytest.mark.skipif(not clients_available(), reason="snet-sdk/snet-cli are not installed (run scripts/setup)"),
]

#: The daemon's free-call signing key (the metadata names its address).
FREE_CALL_SIGNER = ACCOUNTS[4]
WHOLE_TOKEN = 10**18
#: How long the service takes per call in the parallel batches.
DELAY_MS = 1000

# Runs the default strategy: sequential calls (free ones first), then
# batches of parallel calls; every reply says which payment type the
# service saw.
SDK_DEFAULT = """
import time
import threading
from snet.sdk.payment_strategies.default_payment_strategy import DefaultPaymentStrategy
# snet-sdk computes each call's payment in the calling thread, and that is
# not thread-safe: its channel cache (a pickle file) gets corrupted
# (EOFError), and a thread may ask GetToken for an amount another thread
# has already passed ("signed amount ... needs to be greater than last
# signed amount").  Serialise that step; the calls themselves overlap.
_metadata, _payment_lock = DefaultPaymentStrategy.get_payment_metadata, threading.Lock()
def _locked_metadata(self, service_client):
    with _payment_lock:
        return _metadata(self, service_client)
DefaultPaymentStrategy.get_payment_metadata = _locked_metadata
from concurrent.futures import ThreadPoolExecutor
from snet.sdk.config import config as snet_config
snet_config.CONCURRENCY = True
client = sdk.create_service_client(
    "test-org", "test-service", group_name="default_group", concurrent_calls={parallel}
)
def call(delay_ms):
    reply = client.call_rpc("Unary", "EchoRequest", delay_ms=delay_ms)
    return [line.split("=", 1)[1] for line in reply.metadata if line.startswith("snet-payment-type=")][0]
free_before = client.get_free_calls_available()
sequential = [call(0) for _ in range({sequential})]
batches = []
with ThreadPoolExecutor({parallel}) as pool:
    for _ in range({batches}):
        start = time.monotonic()
        types = list(pool.map(call, [{delay_ms}] * {parallel}))
        batches.append({{"types": types, "seconds": time.monotonic() - start}})
print("RESULT " + json.dumps({{"free_before": free_before, "sequential": sequential, "batches": batches}}))
"""

# (create_service_client's concurrent_calls overrides the strategy's own:
# snet-sdk sets it on the strategy after construction.)
SDK_PREPAID = """
import time
import threading
from snet.sdk.payment_strategies.prepaid_payment_strategy import PrePaidPaymentStrategy
# snet-sdk computes each call's payment in the calling thread, and that is
# not thread-safe: its channel cache (a pickle file) gets corrupted
# (EOFError), and a thread may ask GetToken for an amount another thread
# has already passed ("signed amount ... needs to be greater than last
# signed amount").  Serialise that step; the calls themselves overlap.
_metadata, _payment_lock = PrePaidPaymentStrategy.get_payment_metadata, threading.Lock()
def _locked_metadata(self, service_client):
    with _payment_lock:
        return _metadata(self, service_client)
PrePaidPaymentStrategy.get_payment_metadata = _locked_metadata
from concurrent.futures import ThreadPoolExecutor
from snet.sdk.payment_strategies.prepaid_payment_strategy import PrePaidPaymentStrategy
client = sdk.create_service_client(
    "test-org", "test-service", group_name="default_group",
    payment_strategy=PrePaidPaymentStrategy(), concurrent_calls={parallel},
)
def add(i):
    return client.call_rpc("add", "Numbers", a=float(i), b=1.0).value
values = [add(0)]  # the first call gets the token
with ThreadPoolExecutor({parallel}) as pool:
    values += list(pool.map(add, range(1, {parallel})))
print("RESULT " + json.dumps(values))
"""


def signed_amount(deployment: Deployment, channel_id: int) -> int:
    channel = make_channel(deployment.daemon.address)
    try:
        return int.from_bytes(deployment.state(channel, channel_id).current_signed_amount, "big")
    finally:
        channel.close()


@pytest.fixture
def with_free_calls(chain: Chain, ipfs: IpfsServer, upstream: Upstream, tmp_path: Path) -> Iterator[Deployment]:  # noqa: F811
    """A deployment whose daemon issues free-call tokens (2 free calls, 1 whole token needed)."""
    extra = {"private_key_for_free_calls": FREE_CALL_SIGNER.private_key, "min_balance_for_free_call": "1"}
    with deployed(
        chain,
        ipfs,
        upstream,
        tmp_path / "daemon",
        api_source=proto_tarball(),
        extra=extra,
        free_call_signer=FREE_CALL_SIGNER.address,
    ) as running:
        yield running


@pytest.fixture
def without_free_calls(chain: Chain, ipfs: IpfsServer, upstream: Upstream, tmp_path: Path) -> Iterator[Deployment]:  # noqa: F811
    """A deployment whose daemon has no free-call key (snet-sdk's defaults must still work)."""
    with deployed(chain, ipfs, upstream, tmp_path / "daemon", api_source=proto_tarball()) as running:
        yield running


def run_default(deployment: Deployment, home: Path, *, sequential: int, batches: int, parallel: int) -> Any:
    script = SDK_DEFAULT.format(sequential=sequential, batches=batches, parallel=parallel, delay_ms=DELAY_MS)
    return run_sdk(script, home, deployment.chain, deployment.ipfs, CLIENT, SIGNER, timeout=180)


def test_sdk_default_strategy_two_free_calls_then_parallel_prepaid_calls(
    with_free_calls: Deployment, tmp_path: Path
) -> None:
    """Default strategy: 2 free calls, then prepaid batches of 4 in parallel; the channel pays only those."""
    deployment = with_free_calls
    deployment.chain.mint(SIGNER.address, WHOLE_TOKEN)  # min_balance_for_free_call: 1 whole token
    channel_id = open_channel(deployment.chain)
    result = run_default(deployment, tmp_path / "sdk", sequential=2, batches=2, parallel=4)
    assert result["free_before"] == 2
    assert result["sequential"] == ["free-call", "free-call"]
    for batch in result["batches"]:
        assert batch["types"] == ["prepaid-call"] * 4
        # The four calls overlapped: one after another they take 4 s at least.
        assert batch["seconds"] < 3.5 * DELAY_MS / 1000, batch
    # Each batch prepaid 4 calls (the free calls cost nothing).
    assert signed_amount(deployment, channel_id) == 8 * PRICE


@pytest.mark.parametrize(
    "daemon",
    [
        # No free-call key: the token is empty.
        "without_free_calls",
        # A key, but the signer holds no tokens (1 whole token is needed): Go answers
        # PERMISSION_DENIED, which made the default strategy fail every call, paid ones too.
        "with_free_calls",
    ],
)
def test_sdk_default_strategy_without_free_calls_pays_with_prepaid_calls(
    daemon: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """No free call to be had: GetFreeCallToken answers an empty token, 0 free calls, and the SDK prepays."""
    deployment: Deployment = request.getfixturevalue(daemon)
    channel_id = open_channel(deployment.chain)
    result = run_default(deployment, tmp_path / "sdk", sequential=2, batches=1, parallel=2)
    assert result["free_before"] == 0
    assert result["sequential"] == ["prepaid-call", "prepaid-call"]
    assert result["batches"][0]["types"] == ["prepaid-call"] * 2
    assert signed_amount(deployment, channel_id) == 4 * PRICE


def test_sdk_prepaid_strategy_parallel_calls_then_cli_claim_lands_on_chain(
    without_free_calls: Deployment, tmp_path: Path
) -> None:
    """PrePaidPaymentStrategy(3): parallel calls on one channel; snet-cli claims the prepaid amount on chain."""
    deployment = without_free_calls
    chain_ = deployment.chain
    channel_id = open_channel(chain_)
    values = run_sdk(
        SDK_PREPAID.format(parallel=3), tmp_path / "sdk1", chain_, deployment.ipfs, CLIENT, SIGNER, timeout=180
    )
    assert values == [1.0, 2.0, 3.0]
    assert signed_amount(deployment, channel_id) == 3 * PRICE

    endpoint = deployment.daemon.address
    treasurer = Cli(tmp_path / "cli-provider", chain_, deployment.ipfs)
    treasurer.identity("provider", PROVIDER)
    unclaimed = treasurer.run("treasurer", "print-unclaimed", "--endpoint", endpoint).stdout
    assert re.search(rf"^{channel_id}\s+0\s+", unclaimed, re.MULTILINE), unclaimed
    before = int(chain_.mpe.functions.balances(PROVIDER.address).call())
    treasurer.run("treasurer", "claim-all", "--endpoint", endpoint, "-y")
    assert int(chain_.channel(channel_id)[0]) == 1
    assert int(chain_.mpe.functions.balances(PROVIDER.address).call()) - before == 3 * PRICE

    # Prepaid calls continue on the new nonce.
    values = run_sdk(
        SDK_PREPAID.format(parallel=2), tmp_path / "sdk2", chain_, deployment.ipfs, CLIENT, SIGNER, timeout=180
    )
    assert values == [1.0, 2.0]
