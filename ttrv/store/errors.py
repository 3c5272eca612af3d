"""The store's errors: every message names the store, the object or the argument, and what to do."""

from __future__ import annotations


class StoreError(RuntimeError):
    """A store operation failed; the message names the store, the object and what to do."""


class StoreConfigError(StoreError, ValueError):
    """A store URI, key, credential source or argument that cannot work."""


class StoreAuthError(StoreError):
    """The object store refused the credentials (wrong, expired, or lacking permission)."""


class StoreUnavailableError(StoreError):
    """The object store did not answer within the retry budget; retrying the whole job later may succeed."""


class SetNotFoundError(StoreError, LookupError):
    """No complete set (no manifest) under a prefix, or it was deleted or replaced while being read."""


class CorruptVersionError(StoreError):
    """A file of a complete set is missing, truncated or has the wrong checksum."""
