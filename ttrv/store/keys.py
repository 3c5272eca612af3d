"""Names in a store: keys and prefixes, their validation, and the names the store reserves.

A key is a relative `/`-separated path below the store's root; no key can leave its prefix ('..', '.', empty
segments, absolute paths and backslashes are refused), so a caller cannot read or write outside its store."""

from __future__ import annotations

import os
from pathlib import Path

from ttrv.store.errors import StoreConfigError

MANIFEST = "manifest.json"
TEMPORARY = ".ttrv-tmp"
"""Suffix of a file:// object or a fetched directory being written; listings skip it."""
WEIGHTS = "weights"
LEASES = f"{WEIGHTS}/leases"
MAX_KEY_BYTES = 1024
"""S3's limit on an object key (UTF-8 bytes, https://docs.aws.amazon.com/AmazonS3/latest/userguide/object-keys.html);
a store prefix is part of the key, so a name this long can already not be stored on S3."""
MAX_SEGMENT_BYTES = 255
"""NAME_MAX of Linux file systems (ext4, xfs; <linux/limits.h>): a longer segment cannot be a file name in a
file:// store or a fetch folder."""


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
    if len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES or any(
            len(part.encode("utf-8", "surrogatepass")) > MAX_SEGMENT_BYTES for part in key.split("/")):
        raise StoreConfigError(f"{field}: {key[:40]!r}... is too long; keys have at most {MAX_KEY_BYTES} bytes and "
                               f"{MAX_SEGMENT_BYTES} bytes between two '/', use shorter names")
    return key


def local_path(root: Path, name: str, field: str = "key") -> Path:
    """`root/name` for a store name `name`: the one place a name from a store (a key, or a file of a manifest that
    anyone with write access to the store prefix may have written) meets a local folder. The name is checked as a
    key (relative, no '..', '.' or empty segment, no backslash or NUL, bounded), and the joined path is checked to
    lie below `root` once normalised, so that no name can make a reader write or read outside its folder."""
    check_key(name, field)
    path = root.joinpath(*name.split("/"))
    base = os.path.normpath(root)
    if os.path.commonpath([base, os.path.normpath(path)]) != base or os.path.normpath(path) == base:
        raise StoreConfigError(f"{field}: {name!r} leaves {root}; keys cannot leave their prefix, write 'a/b'")
    return path


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
