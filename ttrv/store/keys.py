"""Names in a store: keys and prefixes, their validation, and the names the store reserves.

A key is a relative `/`-separated path below the store's root; no key can leave its prefix ('..', '.', empty
segments, absolute paths and backslashes are refused), so a caller cannot read or write outside its store."""

from __future__ import annotations

from ttrv.store.errors import StoreConfigError

MANIFEST = "manifest.json"
TEMPORARY = ".ttrv-tmp"
"""Suffix of a file:// object or a fetched directory being written; listings skip it."""
WEIGHTS = "weights"
LEASES = f"{WEIGHTS}/leases"


def check_key(key: str, field: str = "key", allow_empty: bool = False) -> str:
    """A relative `/`-separated key without empty, `.` or `..` segments; raises StoreConfigError naming `field`."""
    if not isinstance(key, str):
        raise StoreConfigError(f"{field}: expected a string, got {type(key).__name__}")
    if key == "" and allow_empty:
        return key
    if not key:
        raise StoreConfigError(f"{field}: empty; name the object, e.g. 'weights/v000001'")
    if key.startswith("/"):
        raise StoreConfigError(f"{field}: {key!r} is absolute; keys are relative to the store, drop the leading '/'")
    if "\\" in key or "\x00" in key:
        raise StoreConfigError(f"{field}: {key!r} contains a backslash or NUL; use '/' between parts")
    if any(part in ("", ".", "..") for part in key.split("/")):
        raise StoreConfigError(
            f"{field}: {key!r} has an empty, '.' or '..' segment; keys cannot leave their prefix, write 'a/b'"
        )
    return key


def join_key(*parts: str) -> str:
    return "/".join(part for part in parts if part)


def weights_prefix(step: int) -> str:
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise StoreConfigError(f"step: {step!r} is not a non-negative integer")
    return f"{WEIGHTS}/v{step:06d}"


def parse_step(name: str) -> int | None:
    if len(name) >= 7 and name[0] == "v" and name[1:].isdigit():
        return int(name[1:])
    return None
