"""Organisation and service metadata: typed models, the daemon's group, pricing.

The two JSON documents are published by providers (snet-cli, the
publisher portal) and read by clients (snet-sdk, snet-cli) and daemons.
The models type the fields the daemon uses and keep every other field
(``extra="allow"``), so nothing a later feature needs is lost.

A daemon serves one group (``daemon_group_name``), which must exist in both
documents.  :func:`resolve` joins them into :class:`DaemonMetadata`: the
group id, payment address, expiration threshold, MPE address, pricing and
free-call settings the payment code reads per call.  Every problem found is a
:class:`MetadataError` that names the document and the field, e.g.
``service metadata groups[0].pricing: 2 entries have "default": true``.

Pricing, as in the Go daemon: the group's ``default`` pricing entry decides.
``fixed_price`` is one price for every method; ``fixed_price_per_method``
prices each full gRPC method name (``/package.Service/Method``, the package
coming from the entry's ``package_name``).  Stricter than Go: no default
entry, two default entries, or one method priced twice with different
prices is an error, not "first one wins".

A JSON ``null`` in a field that has a default means that default, as Go's
``encoding/json`` reads a null into a string as ``""``: the publisher portal
writes ``"free_call_signer_address": null`` for a group without a signer,
and a null in a field the daemon does not even use (``endpoints``) must not
make the whole document unusable.  A null in a field without a default
(``payment_address``, ``group_name``) is still refused, naming the field.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Annotated, Any, TypeVar

from eth_utils.address import is_checksum_address, to_checksum_address
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from snet_daemon import jsontext
from snet_daemon.blockchain.contracts import is_address
from snet_daemon.blockchain.errors import MetadataError, PriceNotDefined

__all__ = [
    "DaemonMetadata",
    "MethodPricing",
    "OrgGroup",
    "OrganizationMetadata",
    "PaymentSettings",
    "Pricing",
    "PricingDetail",
    "PricingEntry",
    "ServiceGroup",
    "ServiceMetadata",
    "StorageClientSettings",
    "parse_organization",
    "parse_service",
    "resolve",
]

FIXED_PRICE = "fixed_price"
FIXED_PRICE_PER_METHOD = "fixed_price_per_method"


def _cogs(value: object) -> object:
    """Prices are whole cogs: ints, or digit strings (as some tools write them)."""
    if isinstance(value, bool):
        raise ValueError("is a boolean, not a number of cogs")
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError("is not a whole number of cogs")
        return int(value)
    return value


Cogs = Annotated[int, BeforeValidator(_cogs), Field(ge=0)]


class _Model(BaseModel):
    """Frozen, keeps unknown keys, no coercion surprises beyond the declared ones."""

    model_config = ConfigDict(frozen=True, extra="allow", populate_by_name=True)

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: object) -> object:
        """Drop ``null`` values of fields that have a default, so the default applies.

        Publishers write nulls for "not set" (see the module docstring); a
        required field keeps its null and fails validation, naming the field.
        """
        if not isinstance(data, dict) or None not in data.values():
            return data
        return {
            key: value
            for key, value in data.items()
            if not (value is None and key in cls.model_fields and not cls.model_fields[key].is_required())
        }


# --------------------------------------------------------------------------
# Organisation metadata.


class StorageClientSettings(_Model):
    """``payment.payment_channel_storage_client``: the group's etcd cluster."""

    connection_timeout: str = ""
    request_timeout: str = ""
    endpoints: tuple[str, ...] = ()


class PaymentSettings(_Model):
    """``groups[].payment``."""

    payment_address: str
    payment_expiration_threshold: Annotated[int, Field(ge=0)]
    payment_channel_storage_type: str = "etcd"
    payment_channel_storage_client: StorageClientSettings = Field(default_factory=StorageClientSettings)


class OrgGroup(_Model):
    """One payment group of an organisation."""

    group_name: str
    group_id: str
    payment: PaymentSettings
    license_server_endpoints: tuple[str, ...] = ()


class OrganizationMetadata(_Model):
    """An organisation's metadata document."""

    org_name: str = ""
    org_id: str = ""
    groups: tuple[OrgGroup, ...] = ()


# --------------------------------------------------------------------------
# Service metadata.


class MethodPricing(_Model):
    """``details[].method_pricing[]``."""

    method_name: str
    price_in_cogs: Cogs


class PricingDetail(_Model):
    """``pricing[].details[]``: prices of one gRPC service's methods."""

    service_name: str
    method_pricing: tuple[MethodPricing, ...] = ()


class PricingEntry(_Model):
    """One ``groups[].pricing[]`` entry."""

    price_model: str
    price_in_cogs: Cogs | None = None
    package_name: str = ""
    default: bool = False
    details: tuple[PricingDetail, ...] = ()


class ServiceGroup(_Model):
    """One group of a service."""

    group_name: str
    group_id: str = ""
    pricing: tuple[PricingEntry, ...] = ()
    endpoints: tuple[str, ...] = ()
    daemon_addresses: tuple[str, ...] = ()
    free_calls: Annotated[int, Field(ge=0)] = 0
    free_call_signer_address: str = ""


class ServiceMetadata(_Model):
    """A service's metadata document."""

    version: int = 1
    display_name: str = ""
    encoding: str = "proto"
    service_type: str = "grpc"
    model_ipfs_hash: str = ""
    service_api_source: str = ""
    mpe_address: str = ""
    groups: tuple[ServiceGroup, ...] = ()


# --------------------------------------------------------------------------
# Parsing.


def _location(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(document)"


def _parse(kind: str, model: type[_Model], raw: bytes | str | Mapping[str, Any]) -> Any:
    if isinstance(raw, bytes | str):
        try:
            data = jsontext.loads(raw)
        except ValueError as exc:
            raise MetadataError(f"{kind} metadata is not JSON: {exc}") from None
    else:
        data = raw
    if not isinstance(data, dict):
        raise MetadataError(f"{kind} metadata is not a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{_location(error['loc'])}: "
            + ("is null; a value is required" if error.get("input", ...) is None else error["msg"])
            for error in exc.errors()
        )
        raise MetadataError(f"{kind} metadata {problems}") from None


def parse_organization(raw: bytes | str | Mapping[str, Any]) -> OrganizationMetadata:
    """Parse an organisation metadata document.

    Raises:
        MetadataError: not JSON, or a field has the wrong type.
    """
    result: OrganizationMetadata = _parse("organization", OrganizationMetadata, raw)
    return result


def parse_service(raw: bytes | str | Mapping[str, Any]) -> ServiceMetadata:
    """Parse a service metadata document.

    Raises:
        MetadataError: not JSON, or a field has the wrong type.
    """
    result: ServiceMetadata = _parse("service", ServiceMetadata, raw)
    return result


# --------------------------------------------------------------------------
# Pricing.


@dataclass(frozen=True, slots=True)
class Pricing:
    """Prices of the daemon's group, looked up per call without I/O.

    Attributes:
        model: ``fixed_price`` or ``fixed_price_per_method``.
        fixed: The price of every call (``fixed_price``), else None.
        per_method: Full method name -> price (``fixed_price_per_method``).
    """

    model: str
    fixed: int | None = None
    per_method: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))

    def price(self, method: str) -> int:
        """The price in cogs of a call to ``method`` (``/package.Service/Method``).

        Raises:
            PriceNotDefined: per-method pricing without this method.
        """
        if self.fixed is not None:
            return self.fixed
        try:
            return self.per_method[method]
        except KeyError:
            raise PriceNotDefined(f"price is not defined for the method {method}") from None


def _pricing(group: ServiceGroup, where: str) -> Pricing:
    where = f"{where}.pricing"
    defaults = [(i, entry) for i, entry in enumerate(group.pricing) if entry.default]
    if not defaults:
        raise MetadataError(
            f'service metadata {where}: no entry has "default": true (the daemon needs a default price)'
        )
    if len(defaults) > 1:
        indexes = ", ".join(str(i) for i, _ in defaults)
        raise MetadataError(f'service metadata {where}: ambiguous pricing, entries {indexes} all have "default": true')
    index, entry = defaults[0]
    where = f"{where}[{index}]"
    if entry.price_model == FIXED_PRICE:
        if entry.price_in_cogs is None:
            raise MetadataError(f"service metadata {where}.price_in_cogs: missing for price_model {FIXED_PRICE!r}")
        return Pricing(model=FIXED_PRICE, fixed=entry.price_in_cogs)
    if entry.price_model == FIXED_PRICE_PER_METHOD:
        prefix = f"{entry.package_name}." if entry.package_name else ""
        prices: dict[str, int] = {}
        for d, detail in enumerate(entry.details):
            for m, method in enumerate(detail.method_pricing):
                name = f"/{prefix}{detail.service_name}/{method.method_name}"
                if name in prices and prices[name] != method.price_in_cogs:
                    raise MetadataError(
                        f"service metadata {where}.details[{d}].method_pricing[{m}]: ambiguous pricing, "
                        f"{name} is priced {prices[name]} and {method.price_in_cogs}"
                    )
                prices[name] = method.price_in_cogs
        if not prices:
            raise MetadataError(f"service metadata {where}.details: no method prices for {FIXED_PRICE_PER_METHOD!r}")
        return Pricing(model=FIXED_PRICE_PER_METHOD, per_method=MappingProxyType(prices))
    raise MetadataError(
        f"service metadata {where}.price_model: {entry.price_model!r} is not "
        f"{FIXED_PRICE!r} or {FIXED_PRICE_PER_METHOD!r}"
    )


# --------------------------------------------------------------------------
# The daemon's view.


def _address(value: str, where: str) -> str:
    """A checksummed address; an all-lower/upper one is accepted, a bad checksum is not."""
    if not is_address(value):
        raise MetadataError(f"{where}: {value!r} is not an Ethereum address (0x followed by 40 hex digits)")
    body = value[2:]
    if body != body.lower() and body != body.upper() and not is_checksum_address(value):
        raise MetadataError(f"{where}: {value!r} has a wrong EIP-55 checksum (a mistyped address?)")
    return str(to_checksum_address(value))


def _group_id(value: str, where: str) -> bytes:
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise MetadataError(f"{where}: {value!r} is not base64") from None
    if len(raw) != 32:
        raise MetadataError(f"{where}: decodes to {len(raw)} bytes, not 32")
    return raw


@dataclass(frozen=True, slots=True)
class DaemonMetadata:
    """Both documents, resolved for the daemon's group.

    Attributes:
        organization: The organisation document.
        service: The service document.
        group_name: ``daemon_group_name``.
        group_id: The group id, 32 bytes (channels must carry it).
        group_id_base64: The same as written in metadata (heartbeat daemon id).
        payment_address: Where the group is paid (checksummed); channels
            must name it as recipient.
        payment_expiration_threshold: Blocks a channel must still live
            beyond the current block to be paid into.
        mpe_address: The MultiPartyEscrow contract (checksummed), or ""
            when the service metadata names none.
        pricing: The group's prices.
        free_calls: Free calls per user from metadata (0: none).
        free_call_signer_address: Who signs free-call tokens (checksummed),
            or None.
        storage_client: The group's etcd settings from org metadata.
        encoding: ``proto`` or ``json``.
        service_type: ``grpc``, ``jsonrpc``, ``process`` or ``http``.
        org_uri: Where the organisation document came from.
        service_uri: Where the service document came from.
    """

    organization: OrganizationMetadata
    service: ServiceMetadata
    group_name: str
    group_id: bytes
    group_id_base64: str
    payment_address: str
    payment_expiration_threshold: int
    mpe_address: str
    pricing: Pricing
    free_calls: int
    free_call_signer_address: str | None
    storage_client: StorageClientSettings
    encoding: str
    service_type: str
    org_uri: str = ""
    service_uri: str = ""

    def price(self, method: str) -> int:
        """The price in cogs of a call to ``method``; see :meth:`Pricing.price`."""
        return self.pricing.price(method)


def resolve(
    organization: OrganizationMetadata,
    service: ServiceMetadata,
    group_name: str,
    *,
    org_uri: str = "",
    service_uri: str = "",
) -> DaemonMetadata:
    """Find the daemon's group in both documents and check what payments need.

    Raises:
        MetadataError: naming the document and field: the group is missing
            from either document, its ``group_id`` is not base64 of 32 bytes
            (or differs between the documents), an address is malformed, or
            the pricing has no default, two defaults or conflicting prices.
    """
    org_index, org_group = _find_group(organization.groups, group_name, "organization")
    svc_index, svc_group = _find_group(service.groups, group_name, "service")
    org_where = f"organization metadata groups[{org_index}]"
    svc_where = f"service metadata groups[{svc_index}]"
    group_id = _group_id(org_group.group_id, f"{org_where}.group_id")
    if svc_group.group_id:
        service_group_id = _group_id(svc_group.group_id, f"{svc_where}.group_id")
        if service_group_id != group_id:
            raise MetadataError(
                f"{svc_where}.group_id: {svc_group.group_id!r} differs from the organisation's "
                f"group id {org_group.group_id!r} for group {group_name!r}"
            )
    payment_address = _address(org_group.payment.payment_address, f"{org_where}.payment.payment_address")
    mpe = _address(service.mpe_address, "service metadata mpe_address") if service.mpe_address else ""
    signer = (
        _address(svc_group.free_call_signer_address, f"{svc_where}.free_call_signer_address")
        if svc_group.free_call_signer_address
        else None
    )
    return DaemonMetadata(
        organization=organization,
        service=service,
        group_name=group_name,
        group_id=group_id,
        group_id_base64=org_group.group_id,
        payment_address=payment_address,
        payment_expiration_threshold=org_group.payment.payment_expiration_threshold,
        mpe_address=mpe,
        pricing=_pricing(svc_group, svc_where),
        free_calls=svc_group.free_calls,
        free_call_signer_address=signer,
        storage_client=org_group.payment.payment_channel_storage_client,
        encoding=service.encoding,
        service_type=service.service_type,
        org_uri=org_uri,
        service_uri=service_uri,
    )


_G = TypeVar("_G", OrgGroup, ServiceGroup)


def _find_group(groups: tuple[_G, ...], name: str, kind: str) -> tuple[int, _G]:
    matches = [(i, group) for i, group in enumerate(groups) if group.group_name == name]
    if not matches:
        names = ", ".join(repr(group.group_name) for group in groups) or "none"
        raise MetadataError(
            f"{kind} metadata groups: no group named {name!r} (daemon_group_name); groups present: {names}"
        )
    if len(matches) > 1:
        raise MetadataError(f"{kind} metadata groups: {len(matches)} groups are named {name!r}")
    return matches[0]
