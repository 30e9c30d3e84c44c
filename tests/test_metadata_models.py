"""Metadata documents: parsing, the daemon's group, pricing, and every kind of malformed input."""

from __future__ import annotations

import base64
import copy
import json
from typing import Any

import pytest
from eth_utils.address import to_checksum_address

from snet_daemon.blockchain.errors import MetadataError, PriceNotDefined
from snet_daemon.blockchain.metadata import DaemonMetadata, parse_organization, parse_service, resolve
from tests.support.chain import DEFAULT_GROUP_ID, PROVIDER, SIGNER, org_metadata, service_metadata

MPE = to_checksum_address("0x5e8f6d3f8a1c1b0e3c6a9d0b9e6c1f2a3b4c5d6e")
GROUP = "default_group"


def load(
    org: dict[str, Any] | None = None, service: dict[str, Any] | None = None, group: str = GROUP
) -> DaemonMetadata:
    """Parse and resolve two documents (the samples by default)."""
    org = org if org is not None else org_metadata()
    service = service if service is not None else service_metadata(mpe_address=MPE.lower())
    return resolve(parse_organization(json.dumps(org)), parse_service(json.dumps(service)), group)


def per_method(*details: dict[str, Any], package: str = "example_service", default: bool = True) -> dict[str, Any]:
    """A ``fixed_price_per_method`` pricing entry."""
    return {
        "price_model": "fixed_price_per_method",
        "package_name": package,
        "default": default,
        "details": list(details),
    }


def test_sample_documents_resolve() -> None:
    """The daemon's group is found in both documents and every payment field is typed and normalised."""
    md = load()
    assert md.group_id == DEFAULT_GROUP_ID
    assert md.group_id_base64 == base64.b64encode(DEFAULT_GROUP_ID).decode()
    assert md.payment_address == PROVIDER.address
    assert md.payment_expiration_threshold == 100
    assert md.mpe_address == MPE
    assert md.free_calls == 2
    assert md.free_call_signer_address == SIGNER.address
    assert md.storage_client.endpoints == ("http://127.0.0.1:2379",)
    assert (md.encoding, md.service_type) == ("proto", "grpc")
    assert md.price("/any.Service/Method") == 10


def test_mpe_address_is_checksummed() -> None:
    """An all-lower-case mpe_address comes out EIP-55 checksummed."""
    assert load(service=service_metadata(mpe_address=MPE.lower())).mpe_address == MPE


def test_unknown_keys_are_kept() -> None:
    """Fields the daemon does not use survive parsing (extra keys are kept)."""
    service = service_metadata(mpe_address=MPE)
    service["dynamic_pricing"] = {"/a.B/c": "/a.B/price"}
    parsed = parse_service(json.dumps(service))
    assert parsed.model_extra is not None
    assert parsed.model_extra["dynamic_pricing"] == {"/a.B/c": "/a.B/price"}


def test_null_means_the_default() -> None:
    """A JSON null in a field with a default is that default, as Go reads it: the publisher portal
    writes ``"free_call_signer_address": null`` for a group without a signer, and a null in a field
    the daemon does not use must not make the document unusable."""
    service = service_metadata(mpe_address=MPE)
    group = service["groups"][0]
    group.update(free_call_signer_address=None, free_calls=None, endpoints=None, daemon_addresses=None, group_id=None)
    group["pricing"][0].update(package_name=None, details=None)
    group["pricing"].append({"price_model": "fixed_price", "price_in_cogs": None, "default": None})
    service.update(display_name=None, encoding=None, service_type=None)
    org = org_metadata()
    org["groups"][0]["payment"]["payment_channel_storage_client"] = None
    org["groups"][0]["license_server_endpoints"] = None
    md = load(org=org, service=service)
    assert md.free_call_signer_address is None
    assert md.free_calls == 0
    assert md.price("/a.B/c") == 10
    assert (md.encoding, md.service_type) == ("proto", "grpc")
    assert md.storage_client.endpoints == ()
    assert md.service.groups[0].endpoints == ()
    assert md.service.groups[0].pricing[1].default is False


def test_fixed_price_per_method() -> None:
    """Per-method prices are keyed by the full gRPC method name; an unpriced method is an error."""
    pricing = [
        per_method(
            {"service_name": "Calculator", "method_pricing": [{"method_name": "add", "price_in_cogs": 3}]},
            {"service_name": "Calculator", "method_pricing": [{"method_name": "mul", "price_in_cogs": "7"}]},
        )
    ]
    md = load(service=service_metadata(mpe_address=MPE, pricing=pricing))
    assert md.price("/example_service.Calculator/add") == 3
    assert md.price("/example_service.Calculator/mul") == 7
    with pytest.raises(PriceNotDefined, match=r"/example_service\.Calculator/div"):
        md.price("/example_service.Calculator/div")


def test_per_method_without_package_name() -> None:
    """Without package_name the method key has no package prefix (as in Go)."""
    pricing = [
        per_method({"service_name": "Svc", "method_pricing": [{"method_name": "m", "price_in_cogs": 1}]}, package="")
    ]
    assert load(service=service_metadata(mpe_address=MPE, pricing=pricing)).price("/Svc/m") == 1


def test_non_default_entries_are_ignored() -> None:
    """Only the default entry prices calls; others may exist beside it."""
    pricing = [
        {"price_model": "fixed_price", "price_in_cogs": 99},
        {"price_model": "fixed_price", "price_in_cogs": 5, "default": True},
    ]
    assert load(service=service_metadata(mpe_address=MPE, pricing=pricing)).price("/a.B/c") == 5


def _org(**changes: Any) -> dict[str, Any]:
    org = org_metadata()
    group = org["groups"][0]
    for key, value in changes.items():
        if key in group["payment"]:
            group["payment"][key] = value
        else:
            group[key] = value
    return org


def _service(**changes: Any) -> dict[str, Any]:
    service = service_metadata(mpe_address=MPE)
    for key, value in changes.items():
        if key == "mpe_address":
            service[key] = value
        else:
            service["groups"][0][key] = value
    return service


MALFORMED: list[tuple[str, dict[str, Any] | None, dict[str, Any] | None, str]] = [
    (
        "org group missing",
        _org(group_name="other"),
        None,
        r"organization metadata groups: no group named 'default_group'",
    ),
    ("service group missing", None, _service(group_name="other"), r"service metadata groups: no group named"),
    ("no pricing at all", None, _service(pricing=[]), r"groups\[0\]\.pricing: no entry has \"default\": true"),
    (
        "no default pricing",
        None,
        _service(pricing=[{"price_model": "fixed_price", "price_in_cogs": 1}]),
        r"groups\[0\]\.pricing: no entry has \"default\": true",
    ),
    (
        "two defaults",
        None,
        _service(
            pricing=[
                {"price_model": "fixed_price", "price_in_cogs": 1, "default": True},
                {"price_model": "fixed_price", "price_in_cogs": 2, "default": True},
            ]
        ),
        r"groups\[0\]\.pricing: ambiguous pricing, entries 0, 1",
    ),
    (
        "method priced twice",
        None,
        _service(
            pricing=[
                per_method(
                    {"service_name": "S", "method_pricing": [{"method_name": "m", "price_in_cogs": 1}]},
                    {"service_name": "S", "method_pricing": [{"method_name": "m", "price_in_cogs": 2}]},
                )
            ]
        ),
        r"pricing\[0\]\.details\[1\]\.method_pricing\[0\]: ambiguous pricing, /example_service\.S/m",
    ),
    (
        "per method without methods",
        None,
        _service(pricing=[per_method()]),
        r"pricing\[0\]\.details: no method prices",
    ),
    (
        "fixed price without a price",
        None,
        _service(pricing=[{"price_model": "fixed_price", "default": True}]),
        r"pricing\[0\]\.price_in_cogs: missing",
    ),
    (
        "unknown price model",
        None,
        _service(pricing=[{"price_model": "auction", "price_in_cogs": 1, "default": True}]),
        r"pricing\[0\]\.price_model: 'auction'",
    ),
    (
        "negative price",
        None,
        _service(pricing=[{"price_model": "fixed_price", "price_in_cogs": -1, "default": True}]),
        r"groups\[0\]\.pricing\[0\]\.price_in_cogs",
    ),
    (
        "fractional price",
        None,
        _service(pricing=[{"price_model": "fixed_price", "price_in_cogs": 1.5, "default": True}]),
        r"price_in_cogs: Value error, is not a whole number",
    ),
    ("group id not base64", _org(group_id="not base64!"), None, r"groups\[0\]\.group_id: 'not base64!' is not base64"),
    (
        "group id wrong length",
        _org(group_id=base64.b64encode(b"short").decode()),
        None,
        r"groups\[0\]\.group_id: decodes to 5 bytes, not 32",
    ),
    (
        "group ids differ",
        None,
        _service(group_id=base64.b64encode(bytes(32)).decode()),
        r"service metadata groups\[0\]\.group_id: .* differs",
    ),
    ("payment address malformed", _org(payment_address="0x1234"), None, r"payment\.payment_address: '0x1234' is not"),
    (
        "payment address bad checksum",
        _org(payment_address=PROVIDER.address[:-1] + ("a" if PROVIDER.address[-1] != "a" else "b")),
        None,
        r"payment_address: .* wrong EIP-55 checksum",
    ),
    ("mpe address malformed", None, _service(mpe_address="0xnothex"), r"service metadata mpe_address"),
    (
        "free call signer malformed",
        None,
        _service(free_call_signer_address="nobody"),
        r"groups\[0\]\.free_call_signer_address: 'nobody'",
    ),
    (
        "threshold not a number",
        _org(payment_expiration_threshold="soon"),
        None,
        r"groups\[0\]\.payment\.payment_expiration_threshold",
    ),
    ("groups not a list", {"org_name": "x", "groups": {"a": 1}}, None, r"organization metadata groups"),
    (
        "payment address null",
        _org(payment_address=None),
        None,
        r"organization metadata groups\[0\]\.payment\.payment_address: is null; a value is required",
    ),
    ("service group name null", None, _service(group_name=None), r"service metadata groups\[0\]\.group_name: is null"),
    ("payment section missing", {"groups": [{"group_name": GROUP, "group_id": "x"}]}, None, r"groups\[0\]\.payment"),
]


@pytest.mark.parametrize(("org", "service", "message"), [case[1:] for case in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_malformed_metadata_names_the_field(
    org: dict[str, Any] | None, service: dict[str, Any] | None, message: str
) -> None:
    """Each kind of malformed metadata is a MetadataError naming the document and field."""
    with pytest.raises(MetadataError, match=message):
        load(copy.deepcopy(org) if org else None, copy.deepcopy(service) if service else None)


@pytest.mark.parametrize("raw", [b"not json", b"[1, 2]", b"\xff\xfe", b""])
def test_not_json(raw: bytes) -> None:
    """Documents that are not JSON objects are refused with a clear error."""
    with pytest.raises(MetadataError, match="organization metadata is not"):
        parse_organization(raw)
    with pytest.raises(MetadataError, match="service metadata is not"):
        parse_service(raw)


def test_duplicate_group_names() -> None:
    """Two groups with the daemon's name are ambiguous."""
    org = org_metadata()
    org["groups"].append(copy.deepcopy(org["groups"][0]))
    with pytest.raises(MetadataError, match="2 groups are named 'default_group'"):
        load(org=org)


def test_models_are_frozen() -> None:
    """Metadata objects cannot be modified after loading."""
    md = load()
    with pytest.raises(Exception):  # noqa: B017 - pydantic's or dataclasses' frozen error
        md.organization.groups[0].payment.payment_expiration_threshold = 1  # type: ignore[misc]


def test_deeply_nested_metadata_is_refused_before_decoding() -> None:
    """Nesting is bounded (200 levels) before json's C decoder recurses: with the recursion limit
    py_ecc sets (100,000), 100,000 brackets (a 200 KB document) would crash the daemon."""
    depth = 1_000
    document = '{"display_name": "x", "media": ' + "[" * depth + "]" * depth + "}"
    with pytest.raises(MetadataError, match="service metadata is not JSON: JSON nested deeper than 200"):
        parse_service(document.encode())
