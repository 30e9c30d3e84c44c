"""Contract ABIs, calls and known addresses, from the ``snet-contracts`` package.

Pure code: it turns a call into ``eth_call`` data and an answer into Python
values (``eth-abi``), and knows where the contracts live on the networks the
package lists.  Nothing here does I/O except reading the package's JSON
files once.

Networks:

* ``main`` (chain id 1) and ``sepolia`` (11155111): Registry, MPE and token
  addresses from ``snet-contracts``; ``registry_address_key`` and
  ``mpe_contract_address`` still override them.
* any other name (``local``, a private chain): nothing is known; the Registry
  address must be configured (unless both metadata URIs are), the MPE
  address comes from service metadata (or ``mpe_contract_address``), and the
  token address is read from the MPE contract (``MPE.token()``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

from eth_abi.abi import decode, encode
from eth_abi.exceptions import EncodingError
from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak

__all__ = [
    "ZERO_ADDRESS",
    "AbiFunction",
    "NetworkInfo",
    "abi",
    "event_topic",
    "function",
    "id_to_bytes32",
    "is_address",
    "network_info",
]

ZERO_ADDRESS = "0x0000000000000000000000000000000000000000"

_CHAIN_IDS = {"main": 1, "sepolia": 11155111}


def _resource(*parts: str) -> Any:
    path = resources.files("snet.contracts").joinpath("resources", *parts)
    return json.loads(path.read_text())


@cache
def abi(contract: str) -> tuple[dict[str, Any], ...]:
    """The ABI of ``contract`` (``Registry``, ``MultiPartyEscrow``, ``FetchToken``...)."""
    return tuple(_resource("abi", f"{contract}.json"))


def _type(item: dict[str, Any]) -> str:
    """Canonical ABI type of an input/output, expanding tuples."""
    kind = str(item["type"])
    if kind.startswith("tuple"):
        inner = ",".join(_type(component) for component in item["components"])
        return f"({inner}){kind[5:]}"
    return kind


@dataclass(frozen=True, slots=True)
class AbiFunction:
    """One contract function: how to encode a call and decode its answer.

    Attributes:
        name: Function name.
        inputs: ABI types of the arguments.
        outputs: ABI types of the results.
        selector: First 4 bytes of keccak256 of the signature.
    """

    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    selector: bytes

    def encode_call(self, *args: Any) -> str:
        """``eth_call`` data (hex) for these arguments.

        Raises:
            ValueError: an argument does not fit its ABI type (a channel id
                of 2**256 or more, from a client's bytes).  eth-abi raises
                its own ``EncodingError``, which is no ``ValueError``, and
                would reach the caller as a bug of the daemon.
        """
        try:
            return "0x" + (self.selector + encode(list(self.inputs), list(args))).hex()
        except EncodingError as exc:
            raise ValueError(f"{self.name}() cannot take these arguments: {exc}") from None

    def decode_result(self, data: object) -> tuple[Any, ...]:
        """Decode an ``eth_call`` answer (hex).

        Args:
            data: The JSON-RPC ``result``, whatever JSON the node sent.

        Raises:
            ValueError: the answer is not an encoding of :attr:`outputs` --
                typically ``0x`` because nothing is deployed at the address
                -- or not even a string.
        """
        if not isinstance(data, str):
            raise ValueError(f"{self.name}() returned {type(data).__name__} instead of hex data")
        raw = bytes.fromhex(data[2:] if data.startswith("0x") else data)
        if not raw and self.outputs:
            raise ValueError(f"{self.name}() returned no data (is the contract address right?)")
        try:
            return tuple(decode(list(self.outputs), raw))
        except Exception as exc:  # eth_abi raises several unrelated types
            raise ValueError(f"{self.name}() returned undecodable data: {exc}") from exc


@cache
def function(contract: str, name: str) -> AbiFunction:
    """The function ``name`` of ``contract``, from the package's ABI.

    Raises:
        KeyError: there is no such function (or it is overloaded).
    """
    matches = [item for item in abi(contract) if item.get("type") == "function" and item.get("name") == name]
    if len(matches) != 1:
        raise KeyError(f"{contract}.{name}: {len(matches)} ABI entries")
    item = matches[0]
    inputs = tuple(_type(arg) for arg in item["inputs"])
    outputs = tuple(_type(arg) for arg in item.get("outputs", ()))
    selector = keccak(text=f"{name}({','.join(inputs)})")[:4]
    return AbiFunction(name=name, inputs=inputs, outputs=outputs, selector=selector)


@cache
def event_topic(contract: str, name: str) -> str:
    """``topic0`` (hex) of the event ``name`` of ``contract``."""
    matches = [item for item in abi(contract) if item.get("type") == "event" and item.get("name") == name]
    if len(matches) != 1:
        raise KeyError(f"{contract}.{name}: {len(matches)} event ABI entries")
    inputs = ",".join(_type(arg) for arg in matches[0]["inputs"])
    return "0x" + keccak(text=f"{name}({inputs})").hex()


def id_to_bytes32(identifier: str) -> bytes:
    """An organisation or service id as the Registry keys it: UTF-8, right-padded with NULs.

    Raises:
        ValueError: the id is longer than 32 bytes (the Registry could not hold it).
    """
    raw = identifier.encode("utf-8")
    if len(raw) > 32:
        raise ValueError(f"id {identifier!r} is longer than 32 bytes")
    return raw.ljust(32, b"\0")


def is_address(value: str) -> bool:
    """``0x`` + 40 hex digits."""
    if not (isinstance(value, str) and len(value) == 42 and value[:2] in ("0x", "0X")):
        return False
    try:
        int(value[2:], 16)
    except ValueError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class NetworkInfo:
    """What is known about a network before asking its node.

    Attributes:
        name: ``blockchain_network_selected``.
        chain_id: Expected ``eth_chainId``, or None for a custom network.
        registry: Registry address, or None.
        mpe: MultiPartyEscrow address, or None (metadata's ``mpe_address`` rules).
        token: FET token address, or None (read from ``MPE.token()``).
    """

    name: str
    chain_id: int | None
    registry: str | None
    mpe: str | None
    token: str | None


def _address(contract: str, chain_id: int) -> str | None:
    networks = _resource("networks", f"{contract}.json")
    entry = networks.get(str(chain_id))
    return to_checksum_address(entry["address"]) if entry else None


@cache
def network_info(name: str) -> NetworkInfo:
    """Known addresses for ``name``; a custom network knows nothing."""
    chain_id = _CHAIN_IDS.get(name)
    if chain_id is None:
        return NetworkInfo(name=name, chain_id=None, registry=None, mpe=None, token=None)
    return NetworkInfo(
        name=name,
        chain_id=chain_id,
        registry=_address("Registry", chain_id),
        mpe=_address("MultiPartyEscrow", chain_id),
        token=_address("FetchToken", chain_id),
    )
