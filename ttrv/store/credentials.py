"""S3 credentials: from a mounted Secret directory or the environment, never from the spec, and never in a log line
or an error message."""

from __future__ import annotations

import os
from pathlib import Path

from ttrv.net import holds_userinfo
from ttrv.store.errors import StoreConfigError


def refuse_credentials_in(address: str, field: str) -> None:
    """Refuses an endpoint or a bucket that carries user:password@, naming `field` (the setting it came from) but
    not the value: the message would carry the credential into logs."""
    if holds_userinfo(address):
        raise StoreConfigError(f"{field}: holds credentials (user:password@); remove them and set "
                               "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY")


def _read_secret_dir(directory: str) -> tuple[str, str, str | None]:
    values = {}
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        path = Path(directory, name)
        try:
            values[name] = path.read_text().strip()
        except FileNotFoundError:
            values[name] = None
        except OSError as error:
            raise StoreConfigError(f"TTRV_S3_SECRET_DIR: cannot read {path} ({error.strerror})") from None
    if not values["AWS_ACCESS_KEY_ID"] or not values["AWS_SECRET_ACCESS_KEY"]:
        raise StoreConfigError(f"TTRV_S3_SECRET_DIR={directory}: needs non-empty files AWS_ACCESS_KEY_ID and "
                               "AWS_SECRET_ACCESS_KEY; mount the Secret with those keys (items: key -> path)")
    return values["AWS_ACCESS_KEY_ID"], values["AWS_SECRET_ACCESS_KEY"], values["AWS_SESSION_TOKEN"] or None


def s3_credentials(uri: str) -> tuple[str, str, str | None, str]:
    """(access key, secret key, session token, where they came from) from a Secret directory or the environment."""
    directory = os.environ.get("TTRV_S3_SECRET_DIR")
    if directory:
        return (*_read_secret_dir(directory), f"the Secret mounted at {directory}")
    access, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if not access or not secret:
        raise StoreConfigError(
            f"{uri}: no S3 credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (in a cluster they come "
            "from the Secret named by s3Secret), or TTRV_S3_SECRET_DIR to a directory holding them as files"
        )
    source = "the environment (in a cluster: the Secret named by the experiment's s3Secret)"
    return access, secret, os.environ.get("AWS_SESSION_TOKEN") or None, source
