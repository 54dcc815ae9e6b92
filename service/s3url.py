"""`s3://bucket/key` references and the import allowlist (`CKPT_IMPORT_ALLOWED`): parsing only, stdlib only.

A reference is read literally, as S3 reads keys: no percent-decoding, no path normalisation. What a proxy or an
S3-compatible store might normalise (`.` and `..` segments, empty segments, backslashes, control characters) is
refused rather than interpreted, so that a prefix check on the text is a prefix check on what is read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["S3Location", "parse_import_allowlist", "parse_object_url"]

# Bucket names as S3, Ceph RGW and MinIO accept them (Ceph's legacy names may hold capitals and underscores).
_BUCKET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{1,254}")
_MAX_KEY_BYTES = 1024  # S3's limit
_MAX_URL = 2048


@dataclass(frozen=True)
class S3Location:
    """A bucket and a key (an object) or a key prefix ("" for the whole bucket, else ending in "/")."""

    bucket: str
    key: str

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    def contains(self, other: S3Location) -> bool:
        """Whether `other` (an object) lies under this prefix."""
        return other.bucket == self.bucket and other.key.startswith(self.key)


def _split(url: str, what: str) -> tuple[str, str]:
    if not isinstance(url, str) or len(url) > _MAX_URL:
        raise ValueError(f"{what} must be an s3://bucket/key URL of at most {_MAX_URL} characters")
    scheme, sep, rest = url.partition("://")
    if not sep or scheme != "s3":
        shown = scheme[:16] if sep else url[:16]
        raise ValueError(f"{what} must be an s3://bucket/key URL; {shown!r}:// is not read (only s3://)")
    bucket, _, key = rest.partition("/")
    if _BUCKET.fullmatch(bucket) is None:
        raise ValueError(f"{what} has no valid bucket name: {url[:200]!r}")
    if any(ord(c) < 32 or ord(c) == 127 or c in "\\?#" for c in key):
        raise ValueError(f"{what} holds a control character, a backslash, '?' or '#': {url[:200]!r}")
    if len(key.encode("utf-8", "surrogatepass")) > _MAX_KEY_BYTES:
        raise ValueError(f"{what} has a key longer than {_MAX_KEY_BYTES} bytes")
    segments = key.split("/")
    body = segments[:-1] if key.endswith("/") else segments
    if key and any(s in ("", ".", "..") for s in body):
        raise ValueError(f"{what} has an empty, '.' or '..' path segment: {url[:200]!r}")
    return bucket, key


def parse_object_url(url: str, *, what: str = "url") -> S3Location:
    """The object an `s3://bucket/key` URL names.

    Args:
        url: The URL, e.g. `s3://ckpts/run-7/model.pth`.
        what: The field's name, for the message.

    Raises:
        ValueError: Another scheme, no bucket, no key or a key ending in "/", or a refused key (see the module).
    """
    bucket, key = _split(url, what)
    if not key or key.endswith("/"):
        raise ValueError(f"{what} must name an object (s3://bucket/key), not a bucket or a prefix: {url[:200]!r}")
    return S3Location(bucket, key)


def parse_import_allowlist(raw: str | None) -> tuple[S3Location, ...]:
    """The prefixes of a `CKPT_IMPORT_ALLOWED` value: comma-separated `s3://bucket/` or `s3://bucket/prefix/`.

    A prefix is a folder: `s3://ckpts/team-a` allows `s3://ckpts/team-a/x.pth`, never `s3://ckpts/team-ab/x.pth`.

    Raises:
        ValueError: An entry that is not such a URL; the message names the setting and the entry's position.
    """
    out: list[S3Location] = []
    for position, item in enumerate((raw or "").split(","), start=1):
        entry = item.strip()
        if not entry:
            continue
        try:
            bucket, key = _split(entry, f"CKPT_IMPORT_ALLOWED entry {position}")
        except ValueError as exc:
            raise ValueError(str(exc)) from None
        out.append(S3Location(bucket, key if not key or key.endswith("/") else key + "/"))
    return tuple(out)
