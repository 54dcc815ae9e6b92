"""Service settings, from `CKPT_*` environment variables or constructor arguments. No module-level instance."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.s3url import S3Location, parse_import_allowlist

# Token scopes, weakest first; a token may do what its scope and every weaker one allow.
SCOPES = ("read", "write", "admin")
# A prefix before the first ':' that is one short word is meant as a scope, whatever its case: "READ:abc" or
# "reader:abc" must never silently become a write token named "READ:abc".
# What a label key may be (the store validates labels with it; CKPT_RETENTION_LABEL_KEYS too).
LABEL_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,62}$")
_SCOPE_LIKE = re.compile(r"[A-Za-z][A-Za-z_-]{0,15}")


def parse_tokens(raw: str | None) -> dict[str, str]:
    """Map each token of a `CKPT_API_TOKENS` value to its scope.

    Args:
        raw: Comma-separated entries, each `SCOPE:TOKEN` (scope `read`, `write` or `admin`, any case) or a bare
            TOKEN (a write token).

    Returns:
        Token -> lowercase scope; empty when `raw` holds no entry (the service is open).

    Raises:
        ValueError: An entry's prefix looks like a scope but is not a known one, or a scope has no token. The
            message names the setting and the entry's position, never the token itself.
    """
    out: dict[str, str] = {}
    for position, raw_item in enumerate((raw or "").split(","), start=1):
        item = raw_item.strip()
        if not item:
            continue
        prefix, sep, token = item.partition(":")
        if sep and _SCOPE_LIKE.fullmatch(prefix):
            scope = prefix.lower()
            if scope not in SCOPES:
                raise ValueError(
                    f"CKPT_API_TOKENS entry {position} has the unknown scope {prefix[:16]!r}; known scopes are "
                    f"{', '.join(map(repr, SCOPES))} (write a bare token that contains ':' as 'write:TOKEN')"
                )
            if not token:
                raise ValueError(f"CKPT_API_TOKENS entry {position} has the scope {scope!r} but no token")
            out[token] = scope
        else:
            out[item] = "write"
    return out


def is_loopback(host: str) -> bool:
    """True when `host` is a loopback address or `localhost`: nothing off this machine can connect."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a hostname may resolve to anything


class Settings(BaseSettings):
    """Everything the service can be told. Tests build `Settings(data_dir=tmp_path)` directly."""

    # hide_input_in_errors: a validation error must never print CKPT_API_TOKENS' value into a log.
    model_config = SettingsConfigDict(env_prefix="CKPT_", extra="ignore", hide_input_in_errors=True)

    data_dir: Path = Field(Path("data"), description="The artifact directory (created if missing).")
    # The metadata index (service.store.index). Unset: SQLite in the data directory; a team's replicas share one
    # PostgreSQL database instead.
    database_url: str | None = Field(
        None,
        description="The metadata index: postgresql://USER:PASSWORD@HOST:PORT/DB (psycopg 3, pooled) or "
        "sqlite:///PATH; unset: SQLite at <data_dir>/index.sqlite3.",
    )
    config: Path | None = Field(None, description="TOML file with [architectures.NAME] factories.")
    # The blob store (service.store.blobs). Unset: files under <data_dir>/blobs; s3://bucket/prefix: an S3-compatible
    # object store, with the standard AWS settings (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...). Uploads are staged in
    # the data directory either way.
    storage_url: str | None = Field(
        None,
        description="Where artifact bytes live: s3://BUCKET/PREFIX (endpoint and keys from the standard AWS_* "
        "settings); unset: files in <data_dir>/blobs. Any other value stops start-up.",
    )
    s3_cache_dir: Path | None = Field(
        None, description="The S3 store's local read-through cache (shared by one replica's workers); unset: "
        "<data_dir>/cache/blobs.",
    )
    s3_cache_bytes: int = Field(
        16 << 30, ge=0, description="Size bound of the S3 read-through cache (LRU past it; pinned entries stay)."
    )
    s3_public_endpoint: str | None = Field(
        None, description="The S3 endpoint clients can reach, used as the host of presigned download URLs; "
        "unset: AWS_ENDPOINT_URL.",
    )
    s3_presigned_downloads: bool = Field(
        False, description="With an S3 store, answer GET /checkpoints/{ref}/file with a 307 to a presigned URL "
        "(valid for download_url_ttl_seconds) instead of streaming the bytes through the service.",
    )
    host: str = Field(
        "127.0.0.1", description="Bind address; a non-loopback one without CKPT_API_TOKENS logs a warning."
    )
    port: int = 8000

    max_upload_bytes: int = Field(32 << 30, description="Largest accepted upload (each file of a request); 413.")
    max_request_bytes: int | None = Field(
        None, ge=1, description="Most bytes of files in one request, e.g. the shards of a checkpoint together "
        "(default: 8 x max_upload_bytes); 413 above it, while streaming.",
    )
    heavy_concurrency: int = Field(2, ge=1, description="Parses, merges and value diffs run at once.")
    heavy_queue: int = Field(8, ge=0, description="Heavy jobs that may wait for a slot before 503.")
    read_concurrency: int = Field(
        1, ge=1, description="Heavy read-scope jobs (POST /diff, value diffs, conversions) that run at once."
    )
    read_queue: int = Field(4, ge=0, description="Heavy read jobs that may wait for a slot before 503.")
    heavy_time_budget_seconds: float = Field(
        600, gt=0, description="Seconds of heavy work one request may use; past it, 422 and the parser is replaced."
    )
    retry_after_seconds: int = 2
    body_idle_timeout_seconds: float = Field(
        120, gt=0, description="A request body that sends no bytes for this long is cut off with 408."
    )
    max_json_bytes: int = Field(
        1 << 20, ge=1, description="Largest JSON request body; 413 (before reading when Content-Length says so)."
    )

    # Unset: the service is open.
    api_tokens: str | None = Field(
        None,
        description="Bearer tokens, comma separated, each `read:TOKEN`, `write:TOKEN` or `admin:TOKEN`; a bare "
        "TOKEN is a write token. An unknown scope stops start-up.",
    )

    url_signing_secret: str | None = Field(
        None,
        description="Secret for signed download URLs; unset: generated once into <data_dir>/url-signing.key (0600).",
    )
    download_url_ttl_seconds: int = Field(
        300, ge=1, le=86400, description="How long a signed download URL stays valid."
    )
    root_path: str = Field(
        "",
        description="The path prefix a proxy serves the service under (ASGI root_path, e.g. '/ckpt'); links and "
        "URLs the service builds carry it.",
    )
    cors_origins: str | None = Field(
        None,
        description="Origins a browser dashboard may call the API from, comma separated "
        "(e.g. 'https://dash.example.org,http://localhost:3000'; '*' for any). Unset: no CORS headers.",
    )

    # Globals that weights_only unpickling may additionally accept, as "module.qualname" strings.
    # Applied per load through torch.serialization.safe_globals (scoped), never add_safe_globals.
    safe_globals: list[str] = Field(
        default_factory=list,
        description="Globals weights_only unpickling may also accept, as 'module.qualname' (JSON list); a name "
        "that does not resolve to an allowed class or function stops start-up.",
    )

    # The first parse of every upload runs in a pool of worker processes (service.sandbox), so that a bomb, a
    # hang or a crash in native code costs a worker, not the API process.
    sandbox: bool = Field(True, description="Parse uploads in sandboxed worker processes.")
    sandbox_workers: int = Field(2, ge=1, description="Parser worker processes for writes (parses at once).")
    sandbox_read_workers: int = Field(
        1, ge=1, description="Parser worker processes for read-scope parses (POST /diff), beside the write ones."
    )
    sandbox_memory_headroom: int = Field(
        1 << 30, ge=0, description="Bytes of address space a parse may use beyond its worker and the file size."
    )
    sandbox_time_limit_seconds: float = Field(120, gt=0, description="Seconds one parse may take...")
    sandbox_seconds_per_gb: float = Field(30, ge=0, description="...plus this many seconds per GiB of file.")
    sandbox_wait_seconds: float = Field(30, ge=0, description="Wait for a free parser worker before 503.")

    # One key-count limit, checked while parsing and before any per-key work: tensors or mapping entries in a
    # pickle, tensors in a safetensors header, and (plus a few records) entries in a zip archive.
    max_keys: int = Field(500_000, ge=1, description="Most keys (tensors or entries) in one checkpoint; 422 above.")
    archive_max_entries: int | None = Field(
        None, ge=1, description="Deprecated alias of max_keys (CKPT_MAX_KEYS wins when both are set)."
    )
    archive_max_total_bytes: int = Field(
        64 << 30, ge=1, description="Most uncompressed bytes in a zip checkpoint; 422 above."
    )
    archive_max_name_length: int = Field(1024, ge=1, description="Longest entry name in a zip checkpoint; 422.")
    # Keys that view one storage make a small file that expands to gigabytes (service.core.expansion).
    max_expansion_ratio: float = Field(
        4.0, gt=0, description="An upload's keys may expand to this many times its size, plus 64 MiB; 422 above."
    )
    max_expanded_bytes: int | None = Field(
        None, gt=0, description="Absolute cap on the bytes an upload or a safetensors output expands to "
        "(default: 4 x max_upload_bytes)."
    )

    conversion_cache_bytes: int = Field(
        8 << 30, ge=0, description="Size bound of the conversion cache (downloads with ?format=); LRU past it."
    )
    conversion_cache_max_age_seconds: float = Field(
        7 * 86400, gt=0, description="Conversions unused for this long are removed by garbage collection."
    )

    # Import by reference (service.importer): the service reads these objects itself, with the standard AWS
    # settings (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...). Unset: nothing is read.
    import_allowed: str | None = Field(
        None,
        description="Object-store prefixes POST /checkpoints/import and s3:// refs in POST /merge may read, comma "
        "separated (s3://bucket/ or s3://bucket/prefix/); unset: import by reference is off (403).",
    )

    tmp_grace_seconds: int = Field(
        3600, description="Age after which crash-left temp files and orphan blobs (no index row) are removed."
    )
    artifact_retention_seconds: float | None = Field(
        None,
        gt=0,
        description="Garbage collection deletes artifacts older than this that no name points to and nothing "
        "was made from; unset: artifacts are kept until deleted.",
    )
    retention_days: float | None = Field(
        None,
        gt=0,
        description="Retention policy: garbage collection deletes unnamed artifacts older than this many days "
        "that the policy does not keep (see docs/artifact-store.md); overrides CKPT_ARTIFACT_RETENTION_SECONDS; "
        "unset: off.",
    )
    retention_keep_last: int = Field(
        0, ge=0, description="Retention policy: also keep the newest this many artifacts per (key, value) of each "
        "key in CKPT_RETENTION_LABEL_KEYS."
    )
    retention_label_keys: str | None = Field(
        None, description="Retention policy: label keys (comma separated) whose values keep their newest "
        "CKPT_RETENTION_KEEP_LAST artifacts, e.g. `stage,run`."
    )
    gc_lease_seconds: float = Field(
        6 * 3600, gt=0, description="How long an operation's hold on its inputs protects them from retention GC "
        "if the process dies without releasing it."
    )
    gc_interval_seconds: int = Field(
        600, ge=0, description="How often the server collects garbage (and applies the retention policy); 0: only "
        "at start-up and on POST /admin/gc."
    )

    def retention_age_seconds(self) -> float | None:
        """The retention policy's age: `retention_days`, else `artifact_retention_seconds`; None: off."""
        if self.retention_days is not None:
            return self.retention_days * 86400
        return self.artifact_retention_seconds

    def retention_keys(self) -> tuple[str, ...]:
        """The `retention_label_keys`, split."""
        return tuple(k.strip() for k in (self.retention_label_keys or "").split(",") if k.strip())

    def cors_origin_list(self) -> list[str]:
        """The configured CORS origins (empty: CORS is off)."""
        return [o.strip().rstrip("/") for o in (self.cors_origins or "").split(",") if o.strip()]

    @field_validator("api_tokens")
    @classmethod
    def _known_scopes(cls, value: str | None) -> str | None:
        parse_tokens(value)
        return value

    @field_validator("retention_label_keys")
    @classmethod
    def _valid_label_keys(cls, value: str | None) -> str | None:
        bad = [k.strip() for k in (value or "").split(",") if k.strip() and not LABEL_KEY.fullmatch(k.strip())]
        if bad:
            raise ValueError(f"not label keys: {', '.join(repr(k) for k in bad)}")
        return value

    @field_validator("import_allowed")
    @classmethod
    def _valid_prefixes(cls, value: str | None) -> str | None:
        parse_import_allowlist(value)
        return value

    @model_validator(mode="after")
    def _fold_deprecated(self) -> Settings:
        if self.archive_max_entries is not None and "max_keys" not in self.model_fields_set:
            self.max_keys = self.archive_max_entries
        return self

    def expanded_bytes_cap(self) -> int:
        """`max_expanded_bytes`, or 4 x `max_upload_bytes` when unset."""
        return self.max_expanded_bytes if self.max_expanded_bytes is not None else 4 * self.max_upload_bytes

    def import_prefixes(self) -> tuple[S3Location, ...]:
        """The `import_allowed` prefixes (empty: import by reference is off)."""
        return parse_import_allowlist(self.import_allowed)

    def request_bytes_cap(self) -> int:
        """`max_request_bytes`, or 8 x `max_upload_bytes` when unset."""
        return self.max_request_bytes if self.max_request_bytes is not None else 8 * self.max_upload_bytes

    def tokens(self) -> dict[str, str]:
        """Map each configured token to its scope ("read", "write" or "admin")."""
        return parse_tokens(self.api_tokens)
