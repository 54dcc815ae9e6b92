"""Signed download URLs: an expiring HMAC over one artifact id and one format, so a browser can download
without a Bearer header (a link or `<a download>` cannot carry one).

    sig = HMAC-SHA256(secret, "download\\n{artifact id}\\n{format}\\n{expires}")   (hex)

The signature covers the exact path ref (a full 64-hex id, never a name, whose target may move), the format
and the expiry, so it opens that one file in that one format until it expires and nothing else. The secret
comes from `CKPT_URL_SIGNING_SECRET`, or is generated once into `<data_dir>/url-signing.key` (mode 0600), so
that every process serving one data directory accepts the URLs of the others.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from service.errors import Forbidden, Unauthorized

KEY_FILE = "url-signing.key"


def load_signing_secret(configured: str | None, data_dir: Path) -> bytes:
    """The secret that signs download URLs.

    Args:
        configured: The `CKPT_URL_SIGNING_SECRET` setting, or None.
        data_dir: The artifact directory, where a generated secret is kept.

    Returns:
        The configured secret, else the one in `<data_dir>/url-signing.key`, created (0600) when missing.
    """
    if configured:
        return configured.encode()
    path = data_dir / KEY_FILE
    try:
        return _read_key(path)
    except FileNotFoundError:
        pass
    data_dir.mkdir(parents=True, exist_ok=True)
    tmp = data_dir / f".{KEY_FILE}.{os.getpid()}.{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
            f.flush()
            os.fsync(f.fileno())
        # link() publishes the complete file or fails when another process was first: both then read one key.
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return _read_key(path)


def _read_key(path: Path) -> bytes:
    key = path.read_text().strip()
    if len(key) < 32:
        raise ValueError(f"{path.name} holds no usable secret; delete it to generate a new one")
    return key.encode()


@dataclass(frozen=True)
class DownloadSigner:
    """Signs and checks download URLs with one secret."""

    secret: bytes
    ttl_seconds: int = 300

    def sign(self, artifact_id: str, fmt: str, *, now: float | None = None) -> tuple[int, str]:
        """The expiry (unix seconds) and hex signature of a download of `artifact_id` as `fmt`."""
        expires = int(now if now is not None else time.time()) + self.ttl_seconds
        return expires, self._mac(artifact_id, fmt, expires)

    def check(self, ref: str, fmt: str | None, expires: str | None, sig: str, *, now: float | None = None) -> None:
        """Accept a signed download of `ref` as `fmt`, or raise.

        Raises:
            Unauthorized: The URL expired (or has no expiry).
            Forbidden: The signature is not the one for this ref, format and expiry.
        """
        try:
            expires_at = int(expires or "")
        except ValueError as exc:
            raise Unauthorized("a signed download URL needs 'expires' (unix seconds)") from exc
        if not hmac.compare_digest(self._mac(ref, fmt or "", expires_at).encode(), sig.encode()):
            raise Forbidden("the download signature does not match this artifact, format and expiry")
        if expires_at < (now if now is not None else time.time()):
            raise Unauthorized("the signed download URL expired; ask for a new one")

    def _mac(self, ref: str, fmt: str, expires: int) -> str:
        message = f"download\n{ref}\n{fmt}\n{expires}".encode()
        return hmac.new(self.secret, message, hashlib.sha256).hexdigest()
