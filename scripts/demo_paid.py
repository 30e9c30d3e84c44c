"""The paid demo: a whole SingularityNET deployment on this machine.

1. anvil (a local Ethereum chain) with the real MultiPartyEscrow, Registry
   and token contracts from ``snet-contracts``;
2. the organization and service metadata published through a local
   IPFS-API server and registered in the Registry, as ``snet-cli`` does;
3. the example service (``python -m snet_daemon.example_service``);
4. ``twistd -n snetd`` with payments on, its channel state in an embedded
   etcd;
5. a payment channel opened by the client, then paid calls made by the real
   ``snet-sdk`` (PaidCallPaymentStrategy), with the channel state shown
   before and after.

Run by ``scripts/demo`` (which sets everything up first).  With ``--once``
it exits after the calls; otherwise the daemon keeps running until Ctrl-C.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.conftest import make_channel  # noqa: E402
from tests.support.chain import ANVIL_MISSING, CLIENT, PROVIDER, SIGNER, anvil_available, shared_chain  # noqa: E402
from tests.support.clients import clients_available, proto_tarball, run_sdk  # noqa: E402
from tests.support.ipfs import IpfsServer  # noqa: E402
from tests.support.paid import PRICE, deployed, open_channel  # noqa: E402
from tests.support.ports import free_port  # noqa: E402
from tests.support.upstream import ExampleServiceProcess  # noqa: E402


def say(text: str) -> None:
    print(f"demo: {text}", flush=True)


def show_state(deployment: object, channel_id: int, label: str) -> None:
    channel = make_channel(deployment.daemon.address)  # type: ignore[attr-defined]
    try:
        state = deployment.state(channel, channel_id)  # type: ignore[attr-defined]
    finally:
        channel.close()
    nonce = int.from_bytes(state.current_nonce, "big")
    amount = int.from_bytes(state.current_signed_amount, "big")
    say(f"channel {channel_id} state {label}: nonce {nonce}, signed amount {amount} cogs")


SDK_CALLS = """
from snet.sdk.payment_strategies.paidcall_payment_strategy import PaidCallPaymentStrategy
client = sdk.create_service_client(
    "test-org", "test-service", group_name="default_group", payment_strategy=PaidCallPaymentStrategy()
)
values = [client.call_rpc("add", "Numbers", a=float(a), b=float(b)).value for a, b in [(2, 3), (20, 22), (1, 1)]]
print("RESULT " + json.dumps(values))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--once", action="store_true", help="exit after the calls")
    args = parser.parse_args()
    if not anvil_available():
        say(ANVIL_MISSING)
        return 1
    if not clients_available():
        say("snet-sdk is not installed; run scripts/setup first")
        return 1
    workdir = Path(tempfile.mkdtemp(prefix="snetd-demo-"))
    say("starting a local chain (anvil) and deploying MultiPartyEscrow, Registry and the token")
    chain = shared_chain()
    say(f"  chain at {chain.url}; MPE {chain.mpe.address}; Registry {chain.registry.address}")
    ipfs = IpfsServer().start()
    service = ExampleServiceProcess(free_port())
    say(f"example service on {service.endpoint}")
    say("publishing organization and service metadata (IPFS + Registry), starting snetd with embedded etcd")
    with deployed(chain, ipfs, service, workdir, api_source=proto_tarball()) as deployment:  # type: ignore[arg-type]
        say(f"snetd on {deployment.daemon.address} (log: {deployment.daemon.log_path})")
        channel_id = open_channel(chain)
        say(
            f"client {CLIENT.address} opened channel {channel_id} to provider {PROVIDER.address} "
            f"(payments signed by {SIGNER.address}); price {PRICE} cogs per call"
        )
        show_state(deployment, channel_id, "before")
        say("snet-sdk (PaidCallPaymentStrategy) calls Calculator.add three times through snetd:")
        values = run_sdk(SDK_CALLS, workdir / "sdk-home", chain, ipfs, CLIENT, SIGNER)
        say(f"  results: {values}")
        show_state(deployment, channel_id, "after")
        if not args.once:
            say("snetd keeps running; Ctrl-C stops everything")
            try:
                while True:
                    time.sleep(1)
            except KeyboardInterrupt:
                pass
    service.stop()
    ipfs.stop()
    chain.anvil.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
