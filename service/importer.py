"""Import by reference: a checkpoint read by the service straight from an S3-compatible object store.

`POST /checkpoints/import {"url": "s3://bucket/key"}` and `s3://` refs as `original` / `trained` in `POST /merge`
move no checkpoint bytes through HTTP: the service asks the object store (a HEAD, then one streamed GET) and writes
the object into an ordinary upload of the artifact store (`PendingUpload`: hashed while written, bounded by the
per-file limit). From there it is an upload like any other: the same sandboxed parse and hostile-input checks, and
nothing published unless they pass. The artifact's lineage (operation `import`) records where it came from.

Only objects under the prefixes of `CKPT_IMPORT_ALLOWED` are read; with none, import by reference is off. The
endpoint and credentials are the standard AWS settings (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, ...), read by
boto3's usual chain, as for the S3 blob store.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import botocore.exceptions

from service.core.budget import check_budget
from service.errors import (
    InvalidRequest,
    PayloadTooLarge,
    SourceNotAllowed,
    SourceNotFound,
    SourceUnavailable,
)
from service.s3url import S3Location, parse_object_url
from service.store import PendingUpload
from service.store.blobs.s3 import make_s3_client

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

__all__ = ["ObjectImporter", "RemoteObject", "is_import_url"]

SETTING = "CKPT_IMPORT_ALLOWED"
# One block in flight to the upload while the next is read from the socket: 2 x 8 MiB of memory per import.
BLOCK_BYTES = 8 << 20
_MISSING = {"404", "NoSuchKey", "NoSuchBucket", "NotFound"}
_REMEMBERED = 4096


def is_import_url(ref: str) -> bool:
    """Whether a ref names an object to import (it has a scheme) rather than a stored artifact (an id or name)."""
    return "://" in ref


@dataclass(frozen=True)
class RemoteObject:
    """One version of an object, as its HEAD describes it."""

    location: S3Location
    size: int
    etag: str
    last_modified: str  # ISO-8601

    @property
    def url(self) -> str:
        return self.location.url

    @property
    def filename(self) -> str:
        """The key's last segment: the artifact's `filename`."""
        return self.location.key.rpartition("/")[2]

    def lineage_params(self) -> dict[str, Any]:
        """What an imported artifact's lineage records about its source."""
        return {"url": self.url, "etag": self.etag, "last_modified": self.last_modified, "size": self.size}


class ObjectImporter:
    """Reads allowed objects into uploads. Thread-safe; one boto3 client per process (they are not fork-safe)."""

    def __init__(
        self,
        allowed: Sequence[S3Location],
        *,
        client_factory: Callable[[], S3Client] | None = None,
    ) -> None:
        """Describe the importer; nothing is sent until the first import.

        Args:
            allowed: The readable prefixes (`Settings.import_prefixes()`); empty: every import is refused.
            client_factory: Builds the S3 client; default `make_s3_client()` with boto3's chain (AWS_* settings).
        """
        self.allowed = tuple(allowed)
        self._client_factory = client_factory or make_s3_client
        self._clients: dict[int, S3Client] = {}
        self._lock = threading.Lock()
        # (url, etag, size, last_modified) -> artifact id of what that object version was stored as: importing
        # the same version again costs a HEAD instead of a download. The caller checks that the artifact exists.
        self._stored: OrderedDict[tuple[str, str, int, str], str] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return bool(self.allowed)

    def check(self, url: str, *, field: str = "url") -> S3Location:
        """Parse an import URL and check it against the allowlist; sends nothing.

        Raises:
            InvalidRequest: Not an `s3://bucket/key` URL (another scheme, `..` segments, ...).
            SourceNotAllowed: Import is off, or the object is outside every allowed prefix.
        """
        try:
            location = parse_object_url(url, what=field)
        except ValueError as exc:
            raise InvalidRequest(str(exc), field=field) from None
        if not self.allowed:
            raise SourceNotAllowed(
                f"import by reference is off: {SETTING} lists no s3:// prefix the service may read",
                url=location.url, setting=SETTING,
            )
        if not any(prefix.contains(location) for prefix in self.allowed):
            raise SourceNotAllowed(
                f"{location.url[:300]} is outside the prefixes in {SETTING}", url=location.url, setting=SETTING
            )
        return location

    def head(self, location: S3Location) -> RemoteObject:
        """Ask the object store for the object's size and version (a HEAD).

        Raises:
            SourceNotFound: No such object or bucket.
            SourceUnavailable: The store failed or refused the service's credentials.
        """
        with _S3Errors(location):
            head = self._client().head_object(Bucket=location.bucket, Key=location.key)
        return RemoteObject(
            location=location,
            size=int(head["ContentLength"]),
            etag=str(head.get("ETag", "")).strip('"'),
            last_modified=head["LastModified"].isoformat() if "LastModified" in head else "",
        )

    def stored_as(self, obj: RemoteObject) -> str | None:
        """The artifact id this object version was imported as by this process, if it was."""
        with self._lock:
            artifact_id = self._stored.get(self._version(obj))
            if artifact_id is not None:
                self._stored.move_to_end(self._version(obj))
            return artifact_id

    def remember(self, obj: RemoteObject, artifact_id: str) -> None:
        """Record that this object version is stored as `artifact_id` (see `stored_as`)."""
        if not obj.etag or not obj.last_modified:
            return  # no version to recognise it by
        with self._lock:
            self._stored[self._version(obj)] = artifact_id
            self._stored.move_to_end(self._version(obj))
            while len(self._stored) > _REMEMBERED:
                self._stored.popitem(last=False)

    def download(self, obj: RemoteObject, upload: PendingUpload) -> None:
        """Stream the object into `upload` (hashed while written), refusing it before a byte if it is too large.

        Raises:
            PayloadTooLarge: The object is larger than the upload's limit (checked from the HEAD first).
            SourceNotFound: The object went away.
            SourceUnavailable: The store failed, or the object changed size while it was read.
            TimeBudgetExceeded: The request's time budget ran out between blocks.
        """
        limit = upload.max_bytes
        if limit is not None and obj.size > limit:
            raise PayloadTooLarge(
                f"{obj.url[:300]} has {obj.size} bytes, over the limit of {limit} bytes", limit=limit, url=obj.url
            )
        location = obj.location
        with _S3Errors(location):
            body = self._client().get_object(Bucket=location.bucket, Key=location.key)["Body"]
            try:
                # The next block is read from the socket while this one is written and hashed.
                with ThreadPoolExecutor(1, thread_name_prefix="s3-import") as reader:
                    pending = reader.submit(body.read, BLOCK_BYTES)
                    while block := pending.result():
                        pending = reader.submit(body.read, BLOCK_BYTES)
                        check_budget()
                        upload.write_chunks((block,))
                        del block
            finally:
                body.close()
        if upload.size != obj.size:
            raise SourceUnavailable(
                f"{obj.url[:300]} changed while it was read ({upload.size} bytes, not {obj.size}); try again",
                url=obj.url,
            )

    # -- helpers ----------------------------------------------------------------------------------------------

    @staticmethod
    def _version(obj: RemoteObject) -> tuple[str, str, int, str]:
        return (obj.url, obj.etag, obj.size, obj.last_modified)

    def _client(self) -> S3Client:
        pid = os.getpid()
        client = self._clients.get(pid)
        if client is None:
            with self._lock:
                client = self._clients.get(pid)
                if client is None:
                    client = self._clients[pid] = self._client_factory()
        return client


class _S3Errors:
    """Turns botocore's errors into the service's: missing → SourceNotFound, anything else → SourceUnavailable."""

    def __init__(self, location: S3Location) -> None:
        self.url = location.url

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if isinstance(exc, botocore.exceptions.ClientError):
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            if code in _MISSING:
                raise SourceNotFound(f"no object {self.url[:300]} in the object store", url=self.url) from None
            raise SourceUnavailable(
                f"the object store refused to read {self.url[:300]} ({code or 'error'}); check the service's "
                "AWS_* settings and the object's permissions",
                url=self.url,
            ) from None
        if isinstance(exc, botocore.exceptions.BotoCoreError):
            raise SourceUnavailable(
                f"the object store could not be reached for {self.url[:300]} ({type(exc).__name__})", url=self.url
            ) from None
