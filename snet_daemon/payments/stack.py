"""The payment side of a running daemon, built once the metadata is known.

Everything payments need depends on the organization and service metadata,
which load after startup (and may be reloaded): the payment group's id and
address, the MPE contract, the prices, and even where the storage is (the
Go daemon takes the etcd endpoints from the organization metadata when the
configuration names none; with none anywhere, snetd runs its own etcd).
:class:`PaymentStack` waits for the first metadata, builds the storage,
then the ledger and the daemon's payment services, and rebuilds the
ledger if a reload changes the payment group or the MPE contract.

Until it is ready, paid calls and the payment services answer
``UNAVAILABLE`` with the reason, and the heartbeat shows it: the daemon
never serves a call it cannot charge for.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, Protocol

from twisted.logger import Logger

from snet_daemon._proto.escrow import control_service_pb2 as cpb
from snet_daemon._proto.escrow import state_service_pb2 as spb
from snet_daemon._proto.escrow import token_service_pb2 as tpb
from snet_daemon.frontend.call import ServerCall
from snet_daemon.frontend.status import GrpcError, Status
from snet_daemon.payments import signatures
from snet_daemon.payments.claims import ProviderControl
from snet_daemon.payments.escrow import ChannelSource, EscrowLedger, PaymentTerms
from snet_daemon.payments.freecall import FreeCalls, FreeCallSettings, FreeCallTerms
from snet_daemon.payments.gate import Forwarder, PaymentGate
from snet_daemon.payments.keys import PaymentKeys
from snet_daemon.payments.prepaid import PrepaidLedger, TokenService
from snet_daemon.payments.state_service import ChannelStateService
from snet_daemon.payments.tokens import PrepaidTokens, TokenSettings
from snet_daemon.storage.base import StorageSetupError
from snet_daemon.storage.factory import MetadataStorageClient, StorageSetup
from snet_daemon.storage.keys import KeyLayout

_log = Logger(namespace="snetd.payments")


class Metadata(Protocol):
    """What the stack reads from ``snet_daemon.blockchain.metadata.DaemonMetadata``."""

    @property
    def group_id(self) -> bytes: ...
    @property
    def group_id_base64(self) -> str: ...
    @property
    def group_name(self) -> str: ...
    @property
    def free_calls(self) -> int: ...
    @property
    def free_call_signer_address(self) -> str | None: ...
    @property
    def payment_address(self) -> str: ...
    @property
    def payment_expiration_threshold(self) -> int: ...
    @property
    def storage_client(self) -> Any: ...

    def price(self, method: str) -> int: ...


class MetadataFeed(Protocol):
    """``snet_daemon.blockchain.refresh.MetadataSource`` as the stack uses it."""

    @property
    def current(self) -> Any: ...

    def subscribe(self, callback: Callable[[Any], object]) -> Callable[[], None]: ...


class Reader(ChannelSource, Protocol):
    @property
    def mpe_address(self) -> str | None: ...

    async def token_balance(self, address: str) -> int: ...


#: Builds the storage from the organization metadata's client settings.
StorageFactory = Callable[[MetadataStorageClient], StorageSetup]

#: Seconds the stop gives background refunds and give-backs before the storage closes.
_SETTLE: Final = 3.0


@dataclass
class _Parts:
    key: tuple[bytes, bytes]
    ledger: EscrowLedger
    gate: PaymentGate
    state: ChannelStateService
    control: ProviderControl
    free_calls: FreeCalls
    prepaid: PrepaidLedger
    tokens: TokenService


class PaymentStack:
    """Owns storage, ledger and payment services; serves their handlers.

    Args:
        upstream: forwards paid calls to the service.
        chain: the chain reader.
        metadata: the metadata source.
        make_storage: builds the storage once the metadata is known.
        parse_duration: Go duration text → seconds (for metadata timeouts).
        network: ``blockchain_network_selected`` (part of storage keys).
        organization_id: part of storage keys.
        instance: this daemon instance's name (stored in its holds).
        not_ready: returns the chain/metadata problems, if any.
        service_id: the service (signed into free-call messages).
        free_calls: the free-call configuration.
        tokens: the prepaid-token configuration.
        clock: seconds since the epoch (token expiry).
    """

    def __init__(
        self,
        *,
        upstream: Forwarder,
        chain: Reader,
        metadata: MetadataFeed,
        make_storage: StorageFactory,
        parse_duration: Callable[[str], float],
        network: str,
        organization_id: str,
        instance: str,
        not_ready: Callable[[], tuple[str, ...]],
        service_id: str,
        free_calls: FreeCallSettings,
        tokens: TokenSettings,
        clock: Callable[[], float],
    ) -> None:
        self._upstream = upstream
        self._chain = chain
        self._metadata = metadata
        self._make_storage = make_storage
        self._parse_duration = parse_duration
        self._network = network
        self._organization_id = organization_id
        self._instance = instance
        self._ledgers_built = 0
        self._not_ready = not_ready
        self._service_id = service_id
        self._free_call_settings = free_calls
        self._token_settings = tokens
        self._clock = clock
        self._free_call_terms: FreeCallTerms | None = None
        self._group_id_text = ""
        self._storage: StorageSetup | None = None
        self._storage_error: str | None = None
        self._storage_task: asyncio.Task[None] | None = None
        self._parts: _Parts | None = None
        #: Parts a reload replaced (another group or MPE contract): calls
        #: that started with them may still be refunding through them.
        self._retired: list[_Parts] = []
        self._terms: PaymentTerms | None = None
        self._unsubscribe: Callable[[], None] | None = None

    # -- lifecycle ------------------------------------------------------------------

    def start(self) -> None:
        """Follow the metadata (call with the loop running)."""
        self._unsubscribe = self._metadata.subscribe(self._on_metadata)
        if self._metadata.current is not None:
            self._on_metadata(self._metadata.current)

    async def stop(self) -> None:
        """Stop the storage (after calls have drained: refunds go through it)."""
        if self._unsubscribe is not None:
            self._unsubscribe()
        every = [*self._retired, *([] if self._parts is None else [self._parts])]
        # Refunds of failed calls and of calls cancelled while their payment
        # was written (EscrowLedger, PrepaidLedger), payment writes of
        # unknown outcome, and give-backs of failed free calls run in the
        # background: let them land.
        await asyncio.gather(
            *(
                settle
                for parts in every
                for settle in (
                    parts.ledger.settle(_SETTLE),
                    parts.free_calls.settle(_SETTLE),
                    parts.prepaid.settle(_SETTLE),
                )
            )
        )
        for parts in every:
            parts.ledger.close()  # lingering holds go with our lease's revoke
            parts.free_calls.close()  # give-backs still waiting are logged as lost
            parts.prepaid.close()  # so are refunds
        if self._storage_task is not None and not self._storage_task.done():
            self._storage_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._storage_task
        if self._storage is not None and self._storage.service.running:
            await self._storage.service.stopService().asFuture(asyncio.get_running_loop())

    def problems(self) -> tuple[str, ...]:
        """Why payments cannot be taken now (empty when they can)."""
        reasons = list(self._not_ready())
        # Once started, an embedded etcd that crashed (and is restarting) or
        # stopped answering fails every paid call: the heartbeat says so.
        embedded = self._storage.embedded if self._storage is not None else None
        if self._storage_error is not None:
            reasons.append(f"storage: {self._storage_error}")
        elif embedded is not None and embedded.trouble is not None:
            reasons.append(f"storage: {embedded.trouble}")
        elif self._parts is None and not reasons:
            reasons.append("payments: waiting for metadata and storage")
        return tuple(reasons)

    def storage_mode(self) -> str | None:
        return None if self._storage is None else self._storage.mode

    # -- handlers -----------------------------------------------------------------

    async def paid_call(self, call: ServerCall) -> None:
        """The handler for every call to the service."""
        await self._ready().gate(call)

    async def get_channel_state(self, request: spb.ChannelStateRequest, call: ServerCall) -> spb.ChannelStateReply:
        return await self._ready().state.get_channel_state(request, call)

    async def get_free_call_token(self, request: spb.GetFreeCallTokenRequest, call: ServerCall) -> spb.FreeCallToken:
        return await self._ready().free_calls.get_free_call_token(request, call)

    async def get_free_calls_available(
        self, request: spb.FreeCallStateRequest, call: ServerCall
    ) -> spb.FreeCallStateReply:
        return await self._ready().free_calls.get_free_calls_available(request, call)

    async def get_token(self, request: tpb.TokenRequest, call: ServerCall) -> tpb.TokenReply:
        return await self._ready().tokens.get_token(request, call)

    async def get_list_unclaimed(self, request: cpb.GetPaymentsListRequest, call: ServerCall) -> cpb.PaymentsListReply:
        return await self._ready().control.get_list_unclaimed(request, call)

    async def get_list_in_progress(
        self, request: cpb.GetPaymentsListRequest, call: ServerCall
    ) -> cpb.PaymentsListReply:
        return await self._ready().control.get_list_in_progress(request, call)

    async def start_claim(self, request: cpb.StartClaimRequest, call: ServerCall) -> cpb.PaymentReply:
        return await self._ready().control.start_claim(request, call)

    async def start_claim_for_multiple_channels(
        self, request: cpb.StartMultipleClaimRequest, call: ServerCall
    ) -> cpb.PaymentsListReply:
        return await self._ready().control.start_claim_for_multiple_channels(request, call)

    # -- internals ----------------------------------------------------------------

    def _ready(self) -> _Parts:
        parts = self._parts
        problems = self._not_ready()
        if parts is None or problems:
            reasons = problems or self.problems()
            raise GrpcError(Status.UNAVAILABLE, "the daemon cannot take payments right now: " + "; ".join(reasons))
        return parts

    def _on_metadata(self, metadata: Metadata) -> None:
        if self._storage is None:
            if self._storage_task is None or self._storage_task.done():
                self._storage_task = asyncio.ensure_future(self._start_storage(metadata))
            return
        self._apply(metadata)

    async def _start_storage(self, metadata: Metadata) -> None:
        """Build and start the storage, retrying with backoff until it works.

        An etcd that is down when the daemon starts, or an embedded etcd
        that cannot start yet, must not need a restart of the daemon once
        it is back: nothing else would start the storage again (the metadata
        is followed only when it changes).
        """
        delay = 1.0
        while True:
            current = self._metadata.current or metadata
            client = current.storage_client
            setup: StorageSetup | None = None
            try:
                setup = self._make_storage(
                    MetadataStorageClient(
                        endpoints=tuple(client.endpoints),
                        connection_timeout=self._duration(client.connection_timeout),
                        request_timeout=self._duration(client.request_timeout),
                    )
                )
                setup.service.startService()
                await setup.ready()
                break
            except asyncio.CancelledError:
                # The daemon stops before the storage was ready: what was
                # started (an embedded etcd) stops with it, cleanly.
                if setup is not None and setup.service.running:
                    await setup.service.stopService().asFuture(asyncio.get_running_loop())
                raise
            except Exception as exc:
                self._storage_error = str(exc)
                _log.error("payment storage could not start: {error}", error=exc)
                if setup is not None and setup.service.running:
                    await setup.service.stopService().asFuture(asyncio.get_running_loop())
                if isinstance(exc, StorageSetupError):
                    # Misconfigured (no etcd binary, a bad endpoint or TLS
                    # file): waiting will not fix it.  An embedded etcd that
                    # merely did not start (port in use, data dir locked, too
                    # slow) is an EmbeddedEtcdStartError, retried below.
                    return
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)
        self._storage = setup
        self._storage_error = None
        _log.info("payment storage ready ({mode})", mode=setup.mode)
        current = self._metadata.current
        self._apply(current if current is not None else metadata)

    def _apply(self, metadata: Metadata) -> None:
        """Take new metadata: new terms; a new ledger if group or MPE changed."""
        assert self._storage is not None
        mpe = self._chain.mpe_address
        if not mpe:
            self._storage_error = None
            _log.error("no MPE contract address: set mpe_contract_address or mpe_address in the service metadata")
            return
        mpe_bytes = signatures.address_bytes(mpe)
        self._terms = PaymentTerms(
            mpe_address=mpe_bytes,
            group_id=metadata.group_id,
            payment_address=signatures.address_bytes(metadata.payment_address),
            expiration_threshold=metadata.payment_expiration_threshold,
            price=metadata.price,
        )
        signer = metadata.free_call_signer_address
        self._free_call_terms = FreeCallTerms(
            organization_id=self._organization_id,
            service_id=self._service_id,
            group_name=metadata.group_name,
            group_id=metadata.group_id_base64,
            free_calls=metadata.free_calls,
            signer_address=signatures.address_bytes(signer) if signer else None,
        )
        self._group_id_text = metadata.group_id_base64
        key = (metadata.group_id, mpe_bytes)
        if self._parts is not None and self._parts.key == key:
            self._log_free_call_key(self._parts.free_calls)
            return
        if self._parts is not None:
            self._retired.append(self._parts)
        storage = self._storage.storage
        layout = KeyLayout(self._network, self._organization_id, metadata.group_id, mpe)
        keys = PaymentKeys(layout)
        # A name of its own for each ledger: a hold with the ledger's own
        # name is taken for a leftover of its own and taken over, so a
        # ledger rebuilt for the same group (A, then B, then A again) must
        # not take over a call still running in the retired one.
        self._ledgers_built += 1
        ledger = EscrowLedger(
            storage,
            keys,
            self._chain,
            self._current_terms,
            self._storage.lease_keeper,
            f"{self._instance}#{self._ledgers_built}",
        )
        free_calls = FreeCalls(storage, layout, self._chain, self._free_call_settings, self._current_free_call_terms)
        prepaid = PrepaidLedger(storage, layout)
        tokens = PrepaidTokens(self._token_settings, self._organization_id, self._current_group_id, mpe, self._clock)
        self._parts = _Parts(
            key=key,
            ledger=ledger,
            gate=PaymentGate(self._upstream, ledger, free_calls, (prepaid, tokens), self._price),
            state=ChannelStateService(ledger, storage, keys, self._chain, self._current_terms),
            control=ProviderControl(ledger, storage, keys, self._chain, self._current_terms),
            free_calls=free_calls,
            prepaid=prepaid,
            tokens=TokenService(ledger, prepaid, layout, tokens, self._chain, self._current_terms),
        )
        self._log_free_call_key(free_calls)
        _log.info(
            "taking payments for group {group} on MPE {mpe}",
            group=metadata.group_id.hex(),
            mpe=mpe,
        )

    def _current_terms(self) -> PaymentTerms:
        assert self._terms is not None
        return self._terms

    def _current_free_call_terms(self) -> FreeCallTerms:
        assert self._free_call_terms is not None
        return self._free_call_terms

    def _current_group_id(self) -> str:
        return self._group_id_text

    def _price(self, method: str) -> int:
        return self._current_terms().price(method)

    def _log_free_call_key(self, free_calls: FreeCalls) -> None:
        problem = free_calls.key_problem()
        if problem is not None:
            _log.error("{problem}", problem=problem)

    def _duration(self, text: str) -> float:
        if not text:
            return 0.0
        try:
            return self._parse_duration(text)
        except ValueError:
            return 0.0


def empty_state_service() -> Callable[[spb.ChannelStateRequest, ServerCall], Awaitable[spb.ChannelStateReply]]:
    """``GetChannelState`` with the blockchain disabled: an empty reply, as in Go."""

    async def reply(request: spb.ChannelStateRequest, call: ServerCall) -> spb.ChannelStateReply:
        return spb.ChannelStateReply()

    return reply


def disabled_free_call_service() -> tuple[
    Callable[[spb.GetFreeCallTokenRequest, ServerCall], Awaitable[spb.FreeCallToken]],
    Callable[[spb.FreeCallStateRequest, ServerCall], Awaitable[spb.FreeCallStateReply]],
]:
    """``FreeCallStateService`` with the blockchain disabled: no token, 0 free calls.

    (Go answers errors, which make snet-sdk's default strategy fail every
    call; calls are free anyway when the blockchain is disabled.)
    """

    async def token(request: spb.GetFreeCallTokenRequest, call: ServerCall) -> spb.FreeCallToken:
        return spb.FreeCallToken()

    async def available(request: spb.FreeCallStateRequest, call: ServerCall) -> spb.FreeCallStateReply:
        return spb.FreeCallStateReply(free_calls_available=0)

    return token, available


def empty_token_service() -> Callable[[tpb.TokenRequest, ServerCall], Awaitable[tpb.TokenReply]]:
    """``GetToken`` with the blockchain disabled: an empty reply, as in Go."""

    async def reply(request: tpb.TokenRequest, call: ServerCall) -> tpb.TokenReply:
        return tpb.TokenReply()

    return reply
