"""A local Ethereum chain for tests: anvil, the SingularityNET contracts, and helpers.

anvil comes from npm (``package.json`` pins ``@foundry-rs/anvil-linux-amd64``;
``scripts/setup`` runs ``npm ci``).  One anvil per test process is started on
first use, the contracts are deployed from the ``snet-contracts`` artifacts
(SingularityNetToken stands in for FetchToken, whose shipped bytecode is
runtime code and cannot be deployed), and every test runs between an
``evm_snapshot`` and an ``evm_revert``, so tests see a fresh chain at the cost
of two RPC calls::

    from tests.support.chain import chain  # the fixture

    def test_something(chain: Chain) -> None:
        channel_id = chain.open_channel(amount=100)
        chain.mine(5)

Helpers talk to anvil with a synchronous web3 client.  That is deliberate:
fixtures run outside the event loop, and inside an async test a helper
blocks the loop only for the few milliseconds anvil needs (anvil never waits
on our loop, so this cannot deadlock; the IPFS test server runs in its own
thread for the same reason).

anvil is always ended by PID: at interpreter exit, by :meth:`Anvil.stop`, and
-- should pytest itself be killed -- by the kernel, because the child is
started with ``PR_SET_PDEATHSIG``.
"""

from __future__ import annotations

import atexit
import base64
import ctypes
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account
from web3 import HTTPProvider, Web3
from web3.contract import Contract
from web3.types import Wei

from tests.support.ports import free_port

__all__ = [
    "ACCOUNTS",
    "ANVIL",
    "ANVIL_MISSING",
    "CLIENT",
    "DEFAULT_GROUP_ID",
    "DEPLOYER",
    "GROUP_NAME",
    "ORG_ID",
    "PROVIDER",
    "SERVICE_ID",
    "SIGNER",
    "Anvil",
    "Chain",
    "TestAccount",
    "anvil_available",
    "bytes32",
    "chain",
    "org_metadata",
    "service_metadata",
    "shared_chain",
]

REPO = Path(__file__).resolve().parents[2]
#: The anvil binary installed by ``npm ci``.
ANVIL = REPO / "node_modules" / "@foundry-rs" / "anvil-linux-amd64" / "bin" / "anvil"
#: Why anvil is missing and how to get it: scripts/setup alone cannot
#: install it without npm, and the pinned package is an x86-64 build.
ANVIL_MISSING = (
    "anvil is not installed: it needs x86-64 Linux and Node.js >= 20 with npm; "
    "install those, then run scripts/setup (npm ci)"
)

_ARTIFACTS = Path(str(resources.files("snet.contracts"))) / "resources"


@dataclass(frozen=True)
class TestAccount:
    """One of anvil's pre-funded accounts (its default mnemonic)."""

    __test__ = False  # not a test class, despite the name

    address: str
    private_key: str


def _account(key: str) -> TestAccount:
    return TestAccount(address=Account.from_key(key).address, private_key=key)


#: anvil's well-known default accounts (mnemonic "test test ... junk").
#: 0 deploys and mints, 1 is the client (channel sender), 2 the client's
#: signer, 3 the provider (payment address), 4 and 5 are spare.
ACCOUNTS: tuple[TestAccount, ...] = tuple(
    _account(key)
    for key in (
        "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80",
        "0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d",
        "0x5de4111afa1a4b94908f83103eb1f1706367c2e68ca870fc3fb9a804cdab365a",
        "0x7c852118294e51e653712a81e05800f419141751be58f605c371e15141b007a6",
        "0x47e179ec197488593b187f80a00eb0da91f1b9d0b13f8733639f19c30a34926a",
        "0x8b3a350cf5c34c9194ca85829a2df0ec3153be0318b5e2d3348e872092edffba",
    )
)
DEPLOYER, CLIENT, SIGNER, PROVIDER = ACCOUNTS[:4]

#: The group id the sample metadata uses (32 bytes; base64 in metadata).
DEFAULT_GROUP_ID = bytes(range(1, 33))
#: Registry ids and group name of the sample organisation and service.
ORG_ID = "test-org"
SERVICE_ID = "test-service"
GROUP_NAME = "default_group"

_GAS = 8_000_000
_TX_GAS = 1_000_000
# Above anvil's base fee (1 gwei at genesis, falling on near-empty blocks), so
# web3 need not ask for fee data before every transaction.
_GAS_PRICE = Wei(3 * 10**9)


def bytes32(text: str | bytes) -> bytes:
    """ASCII right-padded to 32 bytes, as the Registry stores ids."""
    raw = text.encode() if isinstance(text, str) else text
    if len(raw) > 32:
        raise ValueError(f"{text!r} is longer than 32 bytes")
    return raw.ljust(32, b"\0")


def anvil_available() -> bool:
    """Whether ``npm ci`` has installed anvil."""
    return ANVIL.is_file() and os.access(ANVIL, os.X_OK)


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    # PR_SET_PDEATHSIG = 1: the kernel sends SIGTERM to anvil if we die.
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)


class Anvil:
    """One anvil process on a loopback port.

    Args:
        port: Port to listen on; a free one by default.  Restarting on the
            same port (:meth:`stop` then :meth:`start`) simulates an RPC
            outage.
        block_time: Seconds between blocks; ``None`` mines only on
            transactions and ``anvil_mine``.
    """

    def __init__(self, port: int | None = None, block_time: float | None = None) -> None:
        self.port = port if port is not None else free_port()
        self.block_time = block_time
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The HTTP JSON-RPC endpoint."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        """The WebSocket JSON-RPC endpoint (same port)."""
        return f"ws://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> Anvil:
        """Start anvil and wait until its port accepts connections."""
        if not anvil_available():
            raise RuntimeError(f"{ANVIL_MISSING} (looked for {ANVIL})")
        args = [str(ANVIL), "--host", "127.0.0.1", "--port", str(self.port), "--silent", "--accounts", "6"]
        if self.block_time is not None:
            args += ["--block-time", str(self.block_time)]
        self.process = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=_die_with_parent,
        )
        atexit.register(self.stop)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode(errors="replace") if self.process.stderr else ""
                raise RuntimeError(f"anvil exited with {self.process.returncode}: {err.strip()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.01)
        self.stop()
        raise RuntimeError(f"anvil did not listen on port {self.port} within {timeout} s")

    def stop(self) -> None:
        """End anvil by PID (TERM, then KILL after 5 s); safe to call twice."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stderr is not None:
            process.stderr.close()

    def __enter__(self) -> Anvil:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _artifact(kind: str, name: str) -> Any:
    return json.loads((_ARTIFACTS / kind / f"{name}.json").read_text())


@dataclass
class Chain:
    """Deployed token + MPE + Registry on one anvil, with helpers.

    Attributes:
        anvil: The process.
        w3: A synchronous web3 client (for helpers only).
        token, mpe, registry: The contracts.
    """

    anvil: Anvil
    w3: Web3
    token: Contract
    mpe: Contract
    registry: Contract
    _snapshots: list[str] = field(default_factory=list)

    # -- deployment ---------------------------------------------------------

    @classmethod
    def deploy(cls, anvil: Anvil) -> Chain:
        """Deploy SingularityNetToken, MultiPartyEscrow and Registry."""
        w3 = Web3(HTTPProvider(anvil.url, request_kwargs={"timeout": 10}))
        token = cls._deploy(w3, "SingularityNetToken", "SingularityNET Token", "AGIX")
        mpe = cls._deploy(w3, "MultiPartyEscrow", token.address)
        registry = cls._deploy(w3, "Registry")
        return cls(anvil=anvil, w3=w3, token=token, mpe=mpe, registry=registry)

    @staticmethod
    def _deploy(w3: Web3, name: str, *args: Any) -> Contract:
        factory = w3.eth.contract(abi=_artifact("abi", name), bytecode=_artifact("bytecode", name))
        data = factory.constructor(*args).data_in_transaction
        tx_hash = w3.eth.send_transaction({"from": DEPLOYER.address, "data": data, "gas": _GAS, "gasPrice": _GAS_PRICE})
        receipt = w3.eth.wait_for_transaction_receipt(tx_hash, timeout=10, poll_latency=0.005)
        if receipt["status"] != 1 or not receipt["contractAddress"]:
            raise RuntimeError(f"deploying {name} failed: {receipt}")
        return w3.eth.contract(address=receipt["contractAddress"], abi=_artifact("abi", name))

    # -- plumbing -----------------------------------------------------------

    @property
    def url(self) -> str:
        """The HTTP JSON-RPC endpoint."""
        return self.anvil.url

    def rpc(self, method: str, *params: Any) -> Any:
        """A raw JSON-RPC call (anvil_*, evm_* ...)."""
        response = self.w3.provider.make_request(method, list(params))  # type: ignore[arg-type]
        if "error" in response:
            raise RuntimeError(f"{method}: {response['error']}")
        return response["result"]

    def transact(self, contract: Contract, function: str, *args: Any, sender: str = DEPLOYER.address) -> Any:
        """Send one transaction and check that it succeeded.

        Gas and gas price are fixed so that web3 does not estimate gas or
        fetch fee data first: a third of the round trips.
        """
        data = contract.encode_abi(function, args=list(args))
        tx_hash = self.w3.eth.send_transaction(
            {"from": sender, "to": contract.address, "data": data, "gas": _TX_GAS, "gasPrice": _GAS_PRICE}
        )
        receipt = self.w3.eth.wait_for_transaction_receipt(tx_hash, timeout=10, poll_latency=0.005)
        if receipt["status"] != 1:
            raise RuntimeError(f"{function}{args!r} reverted")
        return receipt

    def block_number(self) -> int:
        """The latest block number."""
        return int(self.w3.eth.block_number)

    def mine(self, blocks: int = 1) -> int:
        """Mine ``blocks`` empty blocks; returns the new block number."""
        self.rpc("anvil_mine", hex(blocks))
        return self.block_number()

    def snapshot(self) -> None:
        """Remember the chain state (see :meth:`revert`)."""
        self._snapshots.append(self.rpc("evm_snapshot"))

    def revert(self) -> None:
        """Go back to the last :meth:`snapshot` (which is used up)."""
        if not self.rpc("evm_revert", self._snapshots.pop()):
            raise RuntimeError("evm_revert failed")

    # -- tokens and channels ------------------------------------------------

    def mint(self, to: str, amount: int) -> None:
        """Mint ``amount`` tokens (cogs) to ``to``."""
        self.transact(self.token, "mint", to, amount)

    def token_balance(self, address: str) -> int:
        """Token balance of ``address``."""
        return int(self.token.functions.balanceOf(address).call())

    def deposit(self, account: str, amount: int) -> None:
        """Mint, approve and deposit ``amount`` into ``account``'s MPE balance."""
        self.mint(account, amount)
        self.transact(self.token, "approve", self.mpe.address, amount, sender=account)
        self.transact(self.mpe, "deposit", amount, sender=account)

    def open_channel(
        self,
        *,
        sender: str = CLIENT.address,
        signer: str = SIGNER.address,
        recipient: str = PROVIDER.address,
        group_id: bytes = DEFAULT_GROUP_ID,
        amount: int = 1_000_000,
        expiration: int | None = None,
        deposit: bool = True,
    ) -> int:
        """Open a channel and return its id.

        Args:
            sender: Who pays (their MPE balance is debited).
            signer: Who signs payments besides the sender.
            recipient: The provider's payment address.
            group_id: The provider group (32 bytes).
            amount: Cogs locked in the channel.
            expiration: Block after which the sender can reclaim; default
                ``current + 100000``, well past the default threshold.
            deposit: Mint and deposit ``amount`` for ``sender`` first.
        """
        if deposit:
            self.deposit(sender, amount)
        if expiration is None:
            expiration = self.block_number() + 100_000
        channel_id = int(self.mpe.functions.nextChannelId().call())
        self.transact(self.mpe, "openChannel", signer, recipient, group_id, amount, expiration, sender=sender)
        return channel_id

    def add_funds(self, channel_id: int, amount: int, *, sender: str = CLIENT.address) -> None:
        """Deposit ``amount`` more and add it to the channel."""
        self.deposit(sender, amount)
        self.transact(self.mpe, "channelAddFunds", channel_id, amount, sender=sender)

    def extend(self, channel_id: int, expiration: int, *, sender: str = CLIENT.address) -> None:
        """Move the channel's expiration block."""
        self.transact(self.mpe, "channelExtend", channel_id, expiration, sender=sender)

    def channel(self, channel_id: int) -> tuple[Any, ...]:
        """``channels(id)`` as the contract returns it."""
        return tuple(self.mpe.functions.channels(channel_id).call())

    # -- Registry -------------------------------------------------------------

    def publish(
        self,
        ipfs: Any,
        *,
        org: dict[str, Any] | None = None,
        service: dict[str, Any] | None = None,
        org_id: str = ORG_ID,
        service_id: str = SERVICE_ID,
    ) -> tuple[str, str]:
        """Publish org and service metadata through ``ipfs`` and register both.

        Defaults are :func:`org_metadata` and :func:`service_metadata` with
        this chain's MPE.  Returns the two ``ipfs://`` URIs.
        """
        org_uri = "ipfs://" + ipfs.add_json(org if org is not None else org_metadata())
        service_doc = service if service is not None else service_metadata(mpe_address=self.mpe.address)
        service_uri = "ipfs://" + ipfs.add_json(service_doc)
        self.create_org(org_id, org_uri)
        self.create_service(org_id, service_id, service_uri)
        return org_uri, service_uri

    def create_org(self, org_id: str, metadata_uri: str, *, owner: str = PROVIDER.address) -> None:
        """Register an organisation."""
        self.transact(self.registry, "createOrganization", bytes32(org_id), metadata_uri.encode(), [], sender=owner)

    def set_org_uri(self, org_id: str, metadata_uri: str, *, owner: str = PROVIDER.address) -> None:
        """Change an organisation's metadata URI (emits OrganizationModified)."""
        self.transact(
            self.registry, "changeOrganizationMetadataURI", bytes32(org_id), metadata_uri.encode(), sender=owner
        )

    def create_service(self, org_id: str, service_id: str, metadata_uri: str, *, owner: str = PROVIDER.address) -> None:
        """Register a service of an organisation."""
        self.transact(
            self.registry,
            "createServiceRegistration",
            bytes32(org_id),
            bytes32(service_id),
            metadata_uri.encode(),
            sender=owner,
        )

    def set_service_uri(
        self, org_id: str, service_id: str, metadata_uri: str, *, owner: str = PROVIDER.address
    ) -> None:
        """Change a service's metadata URI (emits ServiceMetadataModified)."""
        self.transact(
            self.registry,
            "updateServiceRegistration",
            bytes32(org_id),
            bytes32(service_id),
            metadata_uri.encode(),
            sender=owner,
        )


# -- metadata documents ---------------------------------------------------------


def org_metadata(
    *,
    group_name: str = GROUP_NAME,
    group_id: bytes = DEFAULT_GROUP_ID,
    payment_address: str = PROVIDER.address,
    threshold: int = 100,
    endpoints: tuple[str, ...] = ("http://127.0.0.1:2379",),
) -> dict[str, Any]:
    """An organisation metadata document as snet-cli writes it."""
    return {
        "org_name": "Test Organisation",
        "org_id": ORG_ID,
        "org_type": "organization",
        "description": {"description": "test", "short_description": "test", "url": ""},
        "assets": {},
        "contacts": [],
        "groups": [
            {
                "group_name": group_name,
                "group_id": base64.b64encode(group_id).decode(),
                "payment": {
                    "payment_address": payment_address,
                    "payment_expiration_threshold": threshold,
                    "payment_channel_storage_type": "etcd",
                    "payment_channel_storage_client": {
                        "connection_timeout": "5s",
                        "request_timeout": "3s",
                        "endpoints": list(endpoints),
                    },
                },
            }
        ],
    }


def service_metadata(
    *,
    mpe_address: str,
    group_name: str = GROUP_NAME,
    group_id: bytes = DEFAULT_GROUP_ID,
    price: int = 10,
    pricing: list[dict[str, Any]] | None = None,
    free_calls: int = 2,
    free_call_signer: str = SIGNER.address,
    endpoints: tuple[str, ...] = ("http://127.0.0.1:7000",),
) -> dict[str, Any]:
    """A service metadata document as snet-cli writes it (``fixed_price`` by default)."""
    return {
        "version": 1,
        "display_name": "Test Service",
        "encoding": "proto",
        "service_type": "grpc",
        "service_api_source": "",
        "mpe_address": mpe_address,
        "groups": [
            {
                "group_name": group_name,
                "group_id": base64.b64encode(group_id).decode(),
                "pricing": pricing
                if pricing is not None
                else [{"price_model": "fixed_price", "price_in_cogs": price, "default": True}],
                "endpoints": list(endpoints),
                "free_calls": free_calls,
                "free_call_signer_address": free_call_signer,
            }
        ],
        "service_description": {"url": "", "description": "test", "short_description": "test"},
        "contributors": [],
        "media": [],
        "tags": [],
    }


_shared: Chain | None = None


def shared_chain() -> Chain:
    """The process-wide chain: anvil started and contracts deployed on first use."""
    global _shared
    if _shared is None:
        anvil = Anvil().start()
        try:
            _shared = Chain.deploy(anvil)
        except BaseException:
            anvil.stop()
            raise
    return _shared


@pytest.fixture
def chain() -> Iterator[Chain]:
    """The shared chain, reverted to its freshly deployed state after the test."""
    shared = shared_chain()
    shared.snapshot()
    try:
        yield shared
    finally:
        shared.revert()
