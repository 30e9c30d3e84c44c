"""Payment-state storage: an atomic key-value store with revisions and leases.

* :mod:`.base` -- the :class:`AtomicStorage` protocol, value types, errors;
* :mod:`.memory` -- in-process implementation (tests, single-daemon mode);
* :mod:`.etcd` -- etcd v3 implementation;
* :mod:`.embedded` -- the supervised etcd child process;
* :mod:`.lease` -- the daemon instance's lease, kept alive;
* :mod:`.keys` -- the Go daemon's key layout;
* :mod:`.factory` -- configuration to storage (what ``tap.py`` calls).
"""

from snet_daemon.storage.base import (
    AtomicStorage,
    Condition,
    ConditionFailed,
    Delete,
    Entry,
    Lease,
    LeaseNotFound,
    Op,
    Put,
    StorageError,
    StorageSetupError,
    StorageTimeout,
    StorageUnavailable,
)

__all__ = [
    "AtomicStorage",
    "Condition",
    "ConditionFailed",
    "Delete",
    "Entry",
    "Lease",
    "LeaseNotFound",
    "Op",
    "Put",
    "StorageError",
    "StorageSetupError",
    "StorageTimeout",
    "StorageUnavailable",
]
