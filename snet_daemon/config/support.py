"""What this daemon does with each configuration key, beyond its type.

The models in :mod:`snet_daemon.config.model` are the list of keys.  This
module holds the three facts about keys that are *not* types:

* which keys the Python daemon actually implements today
  (:data:`IMPLEMENTED_KEYS`) -- every other key is accepted so that a Go
  ``snetd.config.json`` loads unchanged, but setting it to a non-default value
  earns one warning, because silently ignoring e.g. ``rate_limit_per_minute``
  would leave an operator believing they are protected;
* the deprecated spellings the Go daemon still migrates
  (:data:`DEPRECATED_ALIASES`, from Go release 5.2, PR #610);
* the stale keys the Go README documents but its code never reads
  (:data:`STALE_KEYS`, :data:`STALE_KEY_PREFIXES`).

When a feature lands, add its keys to :data:`IMPLEMENTED_KEYS`; nothing else
needs to change.  A test checks that every name here is a real key path.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

__all__ = [
    "DEPRECATED_ALIASES",
    "IMPLEMENTED_KEYS",
    "STALE_KEYS",
    "STALE_KEY_PREFIXES",
    "is_stale_key",
]

#: Dotted key paths whose values the Python daemon uses today.
IMPLEMENTED_KEYS: frozenset[str] = frozenset(
    {
        "blockchain_enabled",
        "blockchain_network_selected",
        # snet_daemon.blockchain (chain reader, metadata)
        "ethereum_json_rpc_http_endpoint",
        "ethereum_json_rpc_ws_endpoint",
        "registry_address_key",
        "blockchain_provider_api_key",
        "ipfs_endpoint",
        "lighthouse_endpoint",
        "ipfs_timeout",
        "service_metadata_uri",
        "organization_metadata_uri",
        "block_poll_interval",
        "block_max_age",
        "metadata_refresh_interval",
        "mpe_contract_address",
        "daemon_endpoint",
        "daemon_type",
        "daemon_group_name",
        "organization_id",
        "service_id",
        "service_endpoint",
        "passthrough_enabled",
        "service_timeout",
        "max_message_size_in_mb",
        "max_connections",
        # snet_daemon.upstream (jsonrpc, http, process service types)
        "executable_path",
        "service_credentials",
        "max_concurrent_processes",
        "payment_channel_storage_type",
        "payment_channel_storage_client.connection_timeout",
        "payment_channel_storage_client.request_timeout",
        "payment_channel_storage_client.endpoints",
        "payment_channel_cert_path",
        "payment_channel_key_path",
        "payment_channel_ca_path",
        "payment_channel_storage_server.id",
        "payment_channel_storage_server.scheme",
        "payment_channel_storage_server.host",
        "payment_channel_storage_server.client_port",
        "payment_channel_storage_server.peer_port",
        "payment_channel_storage_server.token",
        "payment_channel_storage_server.cluster",
        "payment_channel_storage_server.startup_timeout",
        "payment_channel_storage_server.data_dir",
        "payment_channel_storage_server.log_level",
        "payment_channel_storage_server.log_outputs",
        "payment_channel_storage_server.enabled",
        "service_heartbeat_type",
        "heartbeat_endpoint",
        "log.level",
        "log.formatter.type",
        "cors_allowed_origins",
        # snet_daemon.payments (free calls, prepaid tokens)
        "private_key_for_free_calls",
        "trusted_free_call_signers",
        "min_balance_for_free_call",
        "free_calls_per_address",
        "token_expiry_in_minutes",
        "token_secret_key",
    }
)

#: Old top-level key -> new top-level key.  The Go daemon copies the old value
#: to the new key with a warning (``migrateDeprecatedParams``); we do the same,
#: except that when both are set the new name wins (Go lets the old one win,
#: which surprises everyone who has started migrating a file).
DEPRECATED_ALIASES: Mapping[str, str] = MappingProxyType(
    {
        "daemon_end_point": "daemon_endpoint",
        "ipfs_end_point": "ipfs_endpoint",
        "passthrough_endpoint": "service_endpoint",
        "metering_end_point": "metering_endpoint",
        "heartbeat_svc_end_point": "heartbeat_endpoint",
        "notification_svc_end_point": "notification_endpoint",
        "pvt_key_for_metering": "private_key_for_metering",
        "pvt_key_for_free_calls": "private_key_for_free_calls",
    }
)

#: Top-level keys from the Go README that Go's code never reads.  Accepted
#: (people copied them from the README into real files) but ignored, with a
#: warning so nobody thinks they do something.
STALE_KEYS: frozenset[str] = frozenset(
    {
        "is_curation_in_progress",
        "curation_address_for_validation",
        "monitoring_enabled",
        "monitoring_svc_end_point",
    }
)

#: Prefixes of stale top-level keys (``hdwallet_index``, ``hdwallet_mnemonic``).
STALE_KEY_PREFIXES: tuple[str, ...] = ("hdwallet_",)


def is_stale_key(key: str) -> bool:
    """Tell whether a (lower-cased) top-level key is a stale README key.

    Args:
        key: A top-level configuration key, already lower-cased.

    Returns:
        True if the key is accepted only to be ignored.
    """
    return key in STALE_KEYS or key.startswith(STALE_KEY_PREFIXES)
