"""Errors of the blockchain and metadata layer.

Callers branch on the class, never on the text: the payment code maps
:class:`ChainUnavailable` and :class:`StaleBlockNumber` to "cannot determine
current block"-style refusals, and the heartbeat reports them; a
:class:`MetadataError` names the JSON field that is wrong so an operator can
fix the document.
"""

from __future__ import annotations

__all__ = [
    "ChainError",
    "ChainUnavailable",
    "ContractCallFailed",
    "MetadataError",
    "MetadataFetchError",
    "PriceNotDefined",
    "RateLimited",
    "StaleBlockNumber",
]


class ChainError(Exception):
    """Base of every error talking to the Ethereum node."""


class ChainUnavailable(ChainError):
    """The JSON-RPC endpoint cannot be reached or answers with a server error.

    Transient by nature: retried with backoff before it is raised.

    Attributes:
        retry_after: Seconds the provider asked us to wait, if it said.
        permanent: Retrying cannot help (the provider refused our
            credentials, or answered more than the client reads).
    """

    def __init__(self, message: str, *, retry_after: float | None = None, permanent: bool = False) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.permanent = permanent


class RateLimited(ChainUnavailable):
    """The JSON-RPC provider refuses calls for now (HTTP 429 or its JSON-RPC equivalent)."""


class ContractCallFailed(ChainError):
    """The node answered, with a JSON-RPC error (a revert, a bad request, an unknown method).

    Also raised, without asking the node, for arguments the call's ABI cannot
    encode (a channel id of 2**256 or more).  Not retried: asking again gets
    the same answer.

    Attributes:
        code: The JSON-RPC error code.
    """

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class StaleBlockNumber(ChainError):
    """The cached block number is missing or older than the configured bound."""


class MetadataError(Exception):
    """Organisation or service metadata is missing, malformed or inconsistent.

    The message names the document and the field (``service metadata
    groups[0].pricing: ...``).
    """


class MetadataFetchError(MetadataError):
    """Metadata could not be fetched (IPFS, gateway, file or Registry unavailable).

    Unlike its base class this is usually transient: a later refresh may succeed.
    """


class PriceNotDefined(MetadataError):
    """The service's per-method pricing has no price for the called method."""
