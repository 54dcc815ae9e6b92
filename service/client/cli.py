"""The `ckpt` command line. Imports no torch, and no httpx or pydantic until a command runs, so
`ckpt --help` starts instantly."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from service.client.maintenance import add_maintenance_parsers
from service.client.serve import add_serve_parser
from service.format_names import OUTPUT_FORMATS

if TYPE_CHECKING:
    from service.client.client import CheckpointClient, Progress, Source

DEFAULT_URL = "http://127.0.0.1:8000"  # service.client.client.DEFAULT_URL, without importing httpx

EPILOG = """\
references:
  REF is an artifact id (64 hex), a unique prefix of one (8 or more hex digits, as `ckpt ls` prints them),
  or a name. Where a command also takes a FILE (diff, merge), an argument
  that names an existing local file is sent as a file (or as its id when the service already has its
  bytes), one that names a directory is sent as the shards of one checkpoint (its *.index.json and the
  shards it names, or its *.safetensors / *.bin weight files); anything else is a REF.
  merge also takes s3://bucket/key, which the service reads itself (see `ckpt import`).

environment:
  CKPT_URL     service URL (default http://127.0.0.1:8000); --url overrides it
  CKPT_TOKEN   bearer token; --token overrides it

exit codes:
  0  ok
  1  the operation failed: the service refused it (a failed verification prints the missing and
     unexpected keys), a download did not verify, or the service could not be reached
  2  usage error (bad arguments, a missing local file)
  141  the output pipe closed early (`ckpt ... | head`); nothing is printed about it
"""

Handler = Callable[["CheckpointClient", argparse.Namespace], int]


class UsageError(Exception):
    """A problem with the command line found after parsing (exit code 2)."""


# -- output helpers --------------------------------------------------------------------------------


def _emit_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True, default=str))


def _human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(c) for c in headers], *[[("-" if c is None else str(c)) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(lines)


def _print_keys(label: str, keys: Sequence[str], *, limit: int = 20, file: Any = None) -> None:
    out = file or sys.stdout
    print(f"{label} ({len(keys)}):", file=out)
    for key in keys[:limit]:
        print(f"  {key}", file=out)
    if len(keys) > limit:
        print(f"  ... {len(keys) - limit} more (use --json for all)", file=out)


@contextlib.contextmanager
def _progress(desc: str) -> Iterator[Progress | None]:
    # No bar when stderr is not a terminal: logs of cluster jobs stay clean.
    if not sys.stderr.isatty():
        yield None
        return
    from tqdm import tqdm

    bar = tqdm(desc=desc, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr, leave=False)

    def update(done: int, total: int | None) -> None:
        if done < bar.n or (total is not None and bar.total != total):
            bar.reset(total=total)  # a new transfer (the download after a merge's uploads)
        bar.update(done - bar.n)

    try:
        yield update
    finally:
        bar.close()


def _source(arg: str) -> Source:
    return Path(arg) if os.path.isfile(arg) or os.path.isdir(arg) else arg


def _existing_file(arg: str) -> Path:
    path = Path(arg)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"no such file: {arg!r}")
    return path


def _existing_file_or_dir(arg: str) -> Path:
    path = Path(arg)
    if not (path.is_file() or path.is_dir()):
        raise argparse.ArgumentTypeError(f"no such file or directory: {arg!r}")
    return path


def _split(raw: str) -> list[str]:
    return [p.strip() for p in raw.split(",") if p.strip()]


def _labels(items: Sequence[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not key or not sep:
            raise UsageError(f"label {item!r} is not of the form key=value")
        out[key] = value
    return out


# -- commands --------------------------------------------------------------------------------------


def _cmd_push(client: CheckpointClient, args: argparse.Namespace) -> int:
    with _progress(f"push {args.file.name}") as progress:
        result = client.push(args.file, name=args.name, labels=_labels(args.label), progress=progress,
                             container_key=args.container_key)
    if args.json:
        _emit_json(result.to_dict())
        return 0
    art = result.artifact
    verb = "uploaded" if result.uploaded else "already stored, nothing sent:"
    if result.uploaded and not result.created:
        verb = "uploaded (existing artifact):"
    names = f"  names: {', '.join(art.names)}" if art.names else ""
    extracted = ""
    if art.lineage is not None and art.lineage.operation == "extract":
        extracted = f"  ({art.lineage.params.get('container_key')!r} of {art.lineage.inputs['checkpoint'][:12]})"
    print(f"{verb} {art.id}  {art.format}  {art.key_count} keys  {_human_bytes(art.size)}{names}{extracted}")
    if art.lineage is not None and art.lineage.operation == "combine":
        shards = art.lineage.params.get("shards") or []
        index = art.lineage.params.get("index") or {}
        checked = f", checked against {index.get('filename')}" if index else ""
        print(f"  combined from {len(shards)} shards{checked}")
    return 0


def _cmd_import(client: CheckpointClient, args: argparse.Namespace) -> int:
    # `objects`, not `url`: that is the service's URL (--url).
    urls: str | list[str] = args.objects[0] if len(args.objects) == 1 else args.objects
    result = client.import_url(urls, name=args.name, labels=_labels(args.label), container_key=args.container_key)
    if args.json:
        _emit_json(result.to_dict())
        return 0
    art = result.artifact
    verb = "imported" if result.created else "already stored:"
    names = f"  names: {', '.join(art.names)}" if art.names else ""
    source = args.objects[0] if len(args.objects) == 1 else f"{len(args.objects)} objects"
    print(f"{verb} {art.id}  {art.format}  {art.key_count} keys  {_human_bytes(art.size)}  from {source}{names}")
    return 0


def _cmd_pull(client: CheckpointClient, args: argparse.Namespace) -> int:
    if args.shards is not None:
        return _pull_shards(client, args)
    dest: str | Path = args.output if args.output else Path.cwd()  # a str: a trailing "/" means a directory
    with _progress(f"pull {args.ref}") as progress:
        result = client.pull(args.ref, dest, format=args.format, progress=progress)
    if args.json:
        _emit_json(result.to_dict())
    else:
        print(f"wrote {result.path}  ({result.id}, {_human_bytes(result.size)}, sha256 verified)")
    return 0


def _pull_shards(client: CheckpointClient, args: argparse.Namespace) -> int:
    if args.output or args.format:
        raise UsageError("--shards DIR writes safetensors shards into DIR: no -o or --format with it")
    with _progress(f"pull {args.ref} (shards)") as progress:
        result = client.pull_shards(args.ref, args.shards, max_shard_size=args.max_shard_size, progress=progress)
    if args.json:
        _emit_json(result.to_dict())
    else:
        print(f"wrote {len(result.files) - 1} shards and {result.files[0].name} to {result.directory}  "
              f"({result.id}, {_human_bytes(result.size)})")
    return 0


def _cmd_ls(client: CheckpointClient, args: argparse.Namespace) -> int:
    filters = {"name": args.name, "label": args.label, "operation": args.operation, "format": args.format}
    if args.all:
        items = list(client.iter_checkpoints(**filters))
        total, next_cursor = len(items), None
    else:
        page = client.list_checkpoints(**filters, limit=args.limit, cursor=args.cursor)
        items, total, next_cursor = page.items, page.total, page.next_cursor
    if args.json:
        _emit_json({"items": [a.model_dump(mode="json") for a in items], "total": total,
                    "next_cursor": next_cursor})
        return 0
    rows = [[a.id[:12], ",".join(a.names) or "-", a.format, a.key_count, _human_bytes(a.size),
             a.lineage.operation if a.lineage else "upload", a.created[:19].replace("T", " ")] for a in items]
    print(_table(["ID", "NAMES", "FORMAT", "KEYS", "SIZE", "FROM", "CREATED"], rows))
    more = f"; next page: --cursor {next_cursor}" if next_cursor else ""
    print(f"{len(items)} of {total}{more}")
    return 0


def _cmd_show(client: CheckpointClient, args: argparse.Namespace) -> int:
    art = client.get(args.ref)
    manifest = client.manifest(art.id) if args.manifest else None
    if args.json:
        data: dict[str, Any] = art.model_dump(mode="json")
        if manifest is not None:
            data["manifest"] = manifest.model_dump(mode="json")
        _emit_json(data)
        return 0
    rows: list[tuple[str, Any]] = [
        ("id", art.id), ("names", ", ".join(art.names) or "-"), ("format", art.format),
        ("size", f"{_human_bytes(art.size)} ({art.size} bytes)"), ("keys", art.key_count),
        ("tensor bytes", _human_bytes(art.tensor_bytes)), ("schema", art.schema_fingerprint[:16]),
        ("created", art.created), ("filename", art.filename or "-"),
        ("container key", art.container_key or "-"),
        ("labels", ", ".join(f"{k}={v}" for k, v in sorted(art.labels.items())) or "-"),
    ]
    if art.lineage is not None:
        inputs = ", ".join(f"{k}={v[:12]}" for k, v in sorted(art.lineage.inputs.items()))
        rows.append(("lineage", f"{art.lineage.operation} ({inputs})"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key.ljust(width)}  {value}")
    if manifest is not None:
        print()
        print(_table(["KEY", "SHAPE", "DTYPE", "BYTES"],
                     [[k, "x".join(map(str, e.shape)) or "scalar", e.dtype, e.nbytes]
                      for k, e in manifest.entries.items()]))
    return 0


def _cmd_diff(client: CheckpointClient, args: argparse.Namespace) -> int:
    frozen: bool | list[str] = False
    if args.frozen is not None:
        frozen = True if args.frozen == "true" else _split(args.frozen)
    normalize: bool | Literal["align"] = "align" if args.align_prefixes else args.normalize_prefixes
    diff = client.diff(_source(args.a), _source(args.b), normalize_prefixes=normalize,
                       values=args.values, frozen=frozen, categories=args.category,
                       key_prefix=args.key_prefix, limit=args.limit,
                       a_container_key=args.a_container_key or args.container_key,
                       b_container_key=args.b_container_key or args.container_key)
    if args.json:
        _emit_json(diff.model_dump(mode="json"))
        return 0
    print(f"a: {diff.a}\nb: {diff.b}" + ("  (prefixes normalized)" if diff.normalized else ""))
    if diff.alignment is not None:
        print(f"aligned: a {_transform_text(diff.alignment.get('a'))}, b {_transform_text(diff.alignment.get('b'))}"
              f" ({diff.alignment.get('matched', 0)} keys in common)")
    print(_table(["CATEGORY", "KEYS"], [[cat, n] for cat, n in diff.summary.items()]))
    for cat, listed in diff.keys.items():
        if cat != "unchanged" and listed.total:
            print()
            _print_keys(cat, listed.keys)
            for key in listed.keys[:20]:
                detail = diff.details.get(cat, {}).get(key)
                if detail is not None:
                    print(f"    {key}: {detail}")
    if diff.changes is not None:
        print()
        print(f"value changes (modules to depth {args.depth}):")
        _print_change_rollup(diff.changes, depth=args.depth, limit=50, indent="")
    if diff.frozen is not None:
        changed = list(diff.frozen.get("changed") or [])
        print()
        checked = diff.frozen.get("checked", "?")
        print(f"frozen check ({checked} tensors): " + ("ok, unchanged" if not changed else
                                                        f"{len(changed)} changed"))
        if changed:
            _print_keys("changed frozen tensors", changed)
    return 0


def _transform_text(transform: Any) -> str:
    # A KeyTransform.to_dict() in words: "strip wrappers, strip 'net.', add 'model.'", or "unchanged".
    t: dict[str, Any] = transform or {}
    steps = (["strip wrappers"] if t.get("strip_wrappers") else []) + (
        [f"strip {t['strip_lead']!r}"] if t.get("strip_lead") else []) + [
        f"strip {p!r}" for p in t.get("strip") or []] + ([f"add {t['add']!r}"] if t.get("add") else [])
    return ", ".join(steps) or "unchanged"


def _fmt_float(value: Any) -> str:
    return "inf" if value is None else f"{float(value):.3g}"


def _print_change_rollup(changes: dict[str, Any], *, depth: int = 1, limit: int = 20, indent: str = "  ") -> None:
    # The top-level modules (and the whole model): what training moved, by how much.
    modules: dict[str, Any] = changes.get("modules") or {}
    if not modules:
        return
    total = modules.get("", {})
    print(f"{indent}changed: {total.get('changed_keys', 0)} of {total.get('keys', 0)} tensors, "
          f"relative change {_fmt_float(total.get('rel_change'))}")
    rows = [[m, f"{c.get('changed_keys', 0)}/{c.get('keys', 0)}", _fmt_float(c.get("rel_change")),
             _fmt_float(c.get("max_abs"))]
            for m, c in modules.items() if m and m.count(".") < depth and c.get("changed_keys")]
    if rows:
        table = _table(["MODULE", "CHANGED", "REL CHANGE", "MAX ABS"], rows[:limit])
        print("\n".join(indent + "  " + line for line in table.splitlines()))
        if len(rows) > limit:
            print(f"{indent}  ... {len(rows) - limit} more modules (use --json for all)")


def _print_verification_failure(exc: Any) -> None:
    print(f"error: {exc.detail or exc.title}", file=sys.stderr)
    verification = (exc.report or {}).get("verification") or {}
    shapes: dict[str, Any] = verification.get("shape_mismatches") or {}
    dtypes: dict[str, Any] = verification.get("dtype_mismatches") or {}
    mismatched = sorted(set(shapes) | set(dtypes))
    if mismatched:
        rows = []
        for key in mismatched[:50]:
            shape, dtype = shapes.get(key) or {}, dtypes.get(key) or {}
            rows.append([key, _shape_text(shape.get("expected")), _shape_text(shape.get("got")),
                         dtype.get("expected", ""), dtype.get("got", "")])
        print(f"mismatched keys ({len(mismatched)}):", file=sys.stderr)
        table = _table(["KEY", "EXPECTED SHAPE", "GOT SHAPE", "EXPECTED DTYPE", "GOT DTYPE"], rows)
        print("\n".join("  " + line for line in table.splitlines()), file=sys.stderr)
        if len(mismatched) > 50:
            print(f"  ... {len(mismatched) - 50} more (use --json for all)", file=sys.stderr)
    for label, keys in (("missing keys", exc.missing_keys), ("unexpected keys", exc.unexpected_keys),
                        ("changed frozen keys", list(exc.problem.get("changed_keys") or [])),
                        ("keys the trained checkpoint lacks", list(exc.problem.get("filled_keys") or [])),
                        ("BatchNorm stats only the trained has", list(exc.problem.get("keys") or []))):
        if keys:  # an empty section says nothing
            _print_keys(label, keys, limit=50, file=sys.stderr)


def _shape_text(shape: Any) -> str:
    if shape is None:
        return "(same)"
    return "x".join(map(str, shape)) or "scalar"


def _hint(exc: Any, args: argparse.Namespace) -> str | None:
    status = getattr(exc, "status", None)
    if status == 401:
        return "pass a token with --token TOKEN or set CKPT_TOKEN (the service has CKPT_API_TOKENS set)"
    if status == 403 and exc.problem.get("setting"):
        return f"the service reads only the object-store prefixes its operator lists in {exc.problem['setting']}"
    if status == 403:
        return "this command needs a write token (--token / CKPT_TOKEN)"
    if status == 409 and args.handler is _cmd_rm and exc.problem.get("names"):
        names = list(exc.problem.get("names") or [])
        return (f"`ckpt rm {args.ref} --force` deletes it and its names, or `ckpt name rm {names[0]}` "
                "removes a name and keeps the checkpoint")
    return None


def _cmd_merge(client: CheckpointClient, args: argparse.Namespace) -> int:
    raw_strip: str = args.strip_prefixes
    strip: Any = raw_strip if raw_strip in ("auto", "known", "none") else _split(raw_strip)
    frozen = _split(args.frozen_prefixes) if args.frozen_prefixes else None
    with _progress("merge") as progress:
        result = client.merge(
            _source(args.original), _source(args.trained), architecture=args.architecture,
            strip_prefixes=strip,
            drop_unexpected=args.drop_unexpected, output_format=args.output_format, name=args.name,
            labels=_labels(args.label), frozen_prefixes=frozen, require_frozen=args.require_frozen,
            frozen_atol=args.frozen_atol, progress=progress, require_complete=args.require_complete,
            allow_swapped=args.allow_swapped, original_container_key=args.original_container_key,
            trained_container_key=args.trained_container_key)
        written = None
        if args.output:
            # By name when it has one, so that `-o out/` writes out/NAME.pth.
            pulled = client.pull(args.name or result.id, args.output, progress=progress)
            if pulled.id != result.id:  # the name moved meanwhile: say so rather than hand over another model
                raise UsageError(f"{args.name!r} now points to {pulled.id}, not to the merge result {result.id}")
            written = pulled.path
    if args.json:
        data = result.model_dump(mode="json")
        if written is not None:
            data["output"] = str(written)
        _emit_json(data)
        return 0
    report = result.report
    verification = report.get("verification") or {}
    state = "stored" if result.created else "already stored"
    print(f"merged against {report.get('architecture', args.architecture)!r}: {state} {result.id}")
    print(f"  verification: {'ok (strict)' if verification.get('ok') else 'FAILED'}")
    filled = list(report.get("filled") or [])
    print(f"  filled from the original: {len(filled)} keys"
          + (f" in {len(report.get('filled_modules') or [])} modules" if filled else ""))
    parameters = report.get("filled_parameters") or {}
    if parameters.get("count"):
        modules = ", ".join(m or "(root)" for m in parameters.get("modules") or {})
        print(f"  of which parameters: {parameters['count']} of {parameters.get('total', '?')} (in {modules})")
    _print_change_rollup(report.get("changes") or {})
    frozen_report = report.get("frozen")
    if frozen_report:
        state = "ok, unchanged" if frozen_report.get("ok") else "CHANGED"
        print(f"  frozen check ({frozen_report.get('checked', '?')} tensors under "
              f"{', '.join(frozen_report.get('prefixes') or [])}): {state}")
    for warning in report.get("warnings") or []:
        print(f"  warning: {warning}")
    if written is not None:
        print(f"wrote {written}  (sha256 verified)")
    return 0


def _cmd_strip(client: CheckpointClient, args: argparse.Namespace) -> int:
    result = client.strip(args.ref, prefixes=args.prefix, output_format=args.output_format, name=args.name,
                          like=args.like, like_architecture=args.like_architecture, container_key=args.container_key)
    if args.json:
        _emit_json(result.model_dump(mode="json"))
    else:
        state = "stored" if result.created else "already stored"
        applied = result.report.get("applied") or {}
        removed = ", ".join(f"{p!r} x{n}" for p, n in sorted(applied.items())) or "none"
        print(f"stripped: {state} {result.id}  (removed: {removed})")
        if "matched" in result.report:
            print(f"  renamed: {_transform_text(result.report.get('transform'))}; "
                  f"{result.report['matched']} of {result.report.get('target_keys', '?')} target keys line up")
    return 0


def _cmd_rm(client: CheckpointClient, args: argparse.Namespace) -> int:
    result = client.delete(args.ref, force=args.force)
    if args.json:
        _emit_json(result.to_dict())
    else:
        names = f"; names removed: {', '.join(result.names_removed)}" if result.names_removed else ""
        print(f"deleted {result.id}{names}")
    return 0


def _cmd_fsck(client: CheckpointClient, args: argparse.Namespace) -> int:
    report = client.fsck(repair=args.repair, deep=args.deep)
    if args.json:
        _emit_json(report.model_dump(mode="json"))
        return 0 if report.ok else 1
    print(f"checked {report.checked} artifacts: {'ok' if report.ok else 'PROBLEMS FOUND'}")
    for label, ids in (("blob missing", report.missing_blobs), ("wrong size", report.size_mismatches),
                       ("bytes do not hash to the id", report.digest_mismatches),
                       ("bad manifest", report.bad_manifests), ("orphan blob (no artifact)", report.orphan_blobs)):
        for artifact_id in ids:
            print(f"  {label}: {artifact_id}")
    for line in report.repaired:
        print(f"  repaired: {line}")
    if report.names_removed:
        print(f"  names removed: {', '.join(report.names_removed)}")
    return 0 if report.ok else 1


def _cmd_label(client: CheckpointClient, args: argparse.Namespace) -> int:
    set_: dict[str, str] = {}
    remove: list[str] = []
    for item in args.changes:
        if "=" not in item and item.endswith("-") and len(item) > 1:
            remove.append(item[:-1])
        else:
            set_.update(_labels([item]))
    art = client.label(args.ref, set=set_, remove=remove)
    if args.json:
        _emit_json(art.model_dump(mode="json"))
        return 0
    changed = art.labels_changed
    if changed is not None:
        for what, keys in (("added", changed.added), ("changed", changed.changed), ("removed", changed.removed)):
            if keys:
                print(f"{what}: {', '.join(keys)}")
    labels = ", ".join(f"{k}={v}" for k, v in sorted(art.labels.items())) or "(none)"
    print(f"{art.id}: {labels}")
    return 0


def _cmd_gc(client: CheckpointClient, args: argparse.Namespace) -> int:
    report = client.gc(apply=args.apply)
    if args.json:
        _emit_json(report.model_dump(mode="json"))
        return 0
    if not report.enabled:
        print("retention is off (set CKPT_RETENTION_DAYS on the server): nothing is removed")
        return 0
    verb = "would remove" if report.dry_run else "removed"
    print(f"{verb} {report.count} artifacts, {report.bytes} bytes ({report.reason})")
    for item in report.removed:
        print(f"  {item.id}  {item.size:>12}  {item.created}")
    if report.skipped:
        print(f"skipped (named or in use meanwhile): {', '.join(report.skipped)}")
    if report.dry_run and report.count:
        print("dry run: nothing was deleted; run `ckpt gc --apply` to delete")
    return 0


def _cmd_arch_ls(client: CheckpointClient, args: argparse.Namespace) -> int:
    archs = client.list_architectures(matches=args.matches)
    if args.json:
        _emit_json(archs.model_dump(mode="json"))
        return 0
    if archs.matches is not None:
        print(f"architectures ranked by fit to {archs.matches.checkpoint[:12]} ({archs.matches.key_count} keys):")
        print(_table(["NAME", "SCORE", "MATCHED", "MISSING", "UNEXPECTED", "SHAPE MISMATCH", "TRANSFORM"],
                     [[m.name, f"{m.score:.3f}", m.matched, m.missing, m.unexpected, m.shape_mismatches,
                       _transform_text(m.transform)] for m in archs.matches.ranking]))
    else:
        print(_table(["NAME", "SOURCE", "KEYS", "SCHEMA", "DESCRIPTION"],
                     [[a.name, a.source, a.key_count, a.schema_fingerprint[:12], a.description or "-"]
                      for a in archs.items]))
    for issue in archs.issues:
        print(f"unavailable: {issue.get('name', '?')} ({issue.get('source', '?')}): {issue.get('error', '')}",
              file=sys.stderr)
    return 0


def _print_architecture(arch: Any) -> None:
    print(f"{arch.name}  ({arch.source}, {arch.key_count} keys, schema {arch.schema_fingerprint[:16]})")
    if arch.description:
        print(arch.description)
    if arch.keys:
        print(_table(["KEY", "SHAPE", "DTYPE"],
                     [[k, "x".join(map(str, s.shape)) or "scalar", s.dtype] for k, s in arch.keys.items()]))


def _cmd_arch_show(client: CheckpointClient, args: argparse.Namespace) -> int:
    arch = client.get_architecture(args.name)
    if args.json:
        _emit_json(arch.model_dump(mode="json"))
    else:
        _print_architecture(arch)
    return 0


def _cmd_arch_register(client: CheckpointClient, args: argparse.Namespace) -> int:
    keys = None
    if args.keys_file is not None:
        try:
            keys = json.loads(args.keys_file.read_text())
        except (OSError, ValueError) as exc:
            raise UsageError(f"cannot read keys from {str(args.keys_file)!r}: {exc}") from exc
        if not isinstance(keys, dict):
            raise UsageError("the keys file must hold a JSON object: key -> {shape, dtype}")
    arch = client.register_architecture(args.name, from_checkpoint=args.from_checkpoint, keys=keys,
                                        description=args.description)
    if args.json:
        _emit_json(arch.model_dump(mode="json"))
    else:
        print(f"registered {arch.name!r}: {arch.key_count} keys, schema {arch.schema_fingerprint[:16]}")
    return 0


def _cmd_arch_rm(client: CheckpointClient, args: argparse.Namespace) -> int:
    client.delete_architecture(args.name)
    if args.json:
        _emit_json({"deleted": args.name})
    else:
        print(f"deleted architecture {args.name!r}")
    return 0


def _cmd_name_set(client: CheckpointClient, args: argparse.Namespace) -> int:
    out = client.set_name(args.name, args.ref)
    if args.json:
        _emit_json(out.model_dump(mode="json"))
    else:
        print(f"{out.name} -> {out.id}")
    return 0


def _cmd_name_ls(client: CheckpointClient, args: argparse.Namespace) -> int:
    names = client.list_names()
    if args.json:
        _emit_json([n.model_dump(mode="json") for n in names])
    else:
        print(_table(["NAME", "ID"], [[n.name, n.id] for n in names]))
    return 0


def _cmd_name_rm(client: CheckpointClient, args: argparse.Namespace) -> int:
    client.delete_name(args.name)
    if args.json:
        _emit_json({"deleted": args.name})
    else:
        print(f"deleted name {args.name!r}")
    return 0


# -- parser ----------------------------------------------------------------------------------------


def _common() -> argparse.ArgumentParser:
    # SUPPRESS defaults: the options work before and after the command without one overwriting the other.
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("service")
    group.add_argument("--url", default=argparse.SUPPRESS,
                       help=f"service URL (CKPT_URL, default {DEFAULT_URL})")
    group.add_argument("--token", default=argparse.SUPPRESS, help="bearer token (CKPT_TOKEN)")
    group.add_argument("--timeout", type=float, default=argparse.SUPPRESS, help="seconds per network read")
    group.add_argument("--retries", type=int, default=argparse.SUPPRESS,
                       help="attempts of idempotent calls on connection errors and 503 (default 4)")
    group.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                       help="print JSON for scripts instead of tables")
    return common


def _add(sub: Any, name: str, handler: Handler, common: argparse.ArgumentParser, **kwargs: Any) -> Any:
    parser = sub.add_parser(name, parents=[common], formatter_class=argparse.RawDescriptionHelpFormatter,
                            **kwargs)
    parser.set_defaults(handler=handler)
    return parser


def build_parser() -> argparse.ArgumentParser:
    """Build the `ckpt` argument parser.

    Returns:
        The parser; each client command sets `handler`, `serve` sets `func`.
    """
    common = _common()
    parser = argparse.ArgumentParser(
        prog="ckpt", parents=[common], epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Checkpoint post-processing service and client: strip, diff, merge and strictly verify "
                    "PyTorch checkpoints of frozen-backbone fine-tunes.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _add(sub, "push", _cmd_push, common, help="upload a checkpoint (skipped when the service has it)",
             description="Upload a checkpoint file, or a directory of shards (a transformers checkpoint: its "
                         "*.index.json and the shards it names, or its *.safetensors / *.bin weight files; "
                         "config and tokenizer files stay) as one checkpoint.")
    p.add_argument("file", type=_existing_file_or_dir, metavar="FILE|DIR")
    p.add_argument("--name", help="point this name at the artifact")
    p.add_argument("--label", action="append", metavar="KEY=VALUE", help="a label (repeatable)")
    p.add_argument("--container-key", metavar="KEY",
                   help="keep this state_dict of the file (dotted, e.g. state_dict_ema or model.ema): the file is "
                        "stored as sent and the answer is a derived artifact holding only it")

    p = _add(sub, "import", _cmd_import, common,
             help="have the service read a checkpoint from its object store (s3://bucket/key), no upload",
             description="The service reads the object itself, with its own credentials, if it lies under a "
                         "prefix of its CKPT_IMPORT_ALLOWED, and stores it with the same checks as an upload.")
    p.add_argument("objects", metavar="URL", nargs="+",
                   help="s3://bucket/key; several: the shards of one checkpoint and its *.index.json")
    p.add_argument("--name", help="point this name at the artifact")
    p.add_argument("--label", action="append", metavar="KEY=VALUE", help="a label (repeatable)")
    p.add_argument("--container-key", metavar="KEY",
                   help="the state_dict to use inside the file (dotted, e.g. model.ema)")

    p = _add(sub, "pull", _cmd_pull, common, help="download a checkpoint, verified against its sha256")
    p.add_argument("ref", metavar="REF")
    p.add_argument("-o", "--output", help="file or directory to write (default: the current directory)")
    p.add_argument("--format", choices=OUTPUT_FORMATS, help="convert on the way out")
    p.add_argument("--shards", metavar="DIR",
                   help="write transformers' sharded safetensors (the index and model-0000x-of-0000y files) to DIR")
    p.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                   help="with --shards: the most tensor bytes in a shard (default 5GB; 500MB, 2GiB, bytes)")

    p = _add(sub, "ls", _cmd_ls, common, help="list checkpoints, newest first")
    p.add_argument("--name", help="only the artifact this name points to")
    p.add_argument("--label", metavar="KEY[=VALUE]", help="only artifacts with this label")
    p.add_argument("--operation", choices=["strip", "merge", "convert", "import", "upload"])
    p.add_argument("--format", help="only this format (pth-zip, pth-legacy, safetensors, ...)")
    p.add_argument("--limit", type=int, default=50, help="page size (default 50)")
    p.add_argument("--cursor", help="continue after a previous page")
    p.add_argument("--all", action="store_true", help="follow the pages to the end")

    p = _add(sub, "show", _cmd_show, common, help="show a checkpoint's metadata and lineage")
    p.add_argument("ref", metavar="REF")
    p.add_argument("--manifest", action="store_true", help="also list every key, shape and dtype")

    p = _add(sub, "diff", _cmd_diff, common, help="diff two checkpoints (stored or local files)")
    p.add_argument("a", metavar="A", help="REF or FILE (the original, for --frozen)")
    p.add_argument("b", metavar="B", help="REF or FILE")
    p.add_argument("-n", "--normalize-prefixes", action="store_true",
                   help="strip wrapper prefixes first (and a Lightning file's LightningModule attribute)")
    p.add_argument("--align-prefixes", action="store_true",
                   help="rename each side (strip or add prefixes) so that the most keys line up")
    p.add_argument("--values", action="store_true",
                   help="value statistics of changed tensors, and per module: relative change, max abs change")
    p.add_argument("--depth", type=int, default=1,
                   help="with --values: show modules up to this many levels deep (default 1)")
    p.add_argument("--frozen", nargs="?", const="true", metavar="PREFIXES",
                   help="check that A's parameters (or the comma-separated key prefixes) are unchanged in B")
    p.add_argument("--category", action="append", help="only this category (repeatable)",
                   choices=["only_in_a", "only_in_b", "shape_mismatch", "dtype_mismatch", "changed",
                            "unchanged"])
    p.add_argument("--key-prefix", help="only keys under this prefix")
    p.add_argument("--limit", type=int, default=1000, help="keys per category (default 1000)")
    p.add_argument("--container-key", metavar="KEY",
                   help="the state_dict to use inside both checkpoints (dotted, e.g. state_dict_ema)")
    p.add_argument("--a-container-key", metavar="KEY",
                   help="the state_dict to use inside A (wins over --container-key)")
    p.add_argument("--b-container-key", metavar="KEY",
                   help="the state_dict to use inside B (wins over --container-key)")

    p = _add(sub, "merge", _cmd_merge, common,
             help="merge a trained checkpoint with its original and verify it strictly",
             description="Fill what the trained state_dict lacks (BatchNorm running stats dropped by "
                         "track_running_stats=False) from the original, verify with "
                         "load_state_dict(strict=True) against the architecture, store the result.")
    p.add_argument("original", metavar="ORIGINAL",
                   help="REF, FILE or s3://bucket/key (read by the service): the pretrained checkpoint")
    p.add_argument("trained", metavar="TRAINED", help="REF, FILE or s3://bucket/key: the fine-tuned checkpoint")
    p.add_argument("-a", "--arch", "--architecture", dest="architecture", required=True,
                   help="registered architecture name (see `ckpt arch ls`)")
    p.add_argument("-o", "--output", help="write the verified result to this file (or directory: a trailing /)")
    p.add_argument("--name", help="point this name at the result")
    p.add_argument("--strip-prefixes", default="auto",
                   help="auto (match the architecture), known, none, or comma-separated prefixes")
    p.add_argument("--drop-unexpected", action="store_true", help="drop keys the architecture does not have")
    p.add_argument("--output-format", choices=OUTPUT_FORMATS, default="pth")
    p.add_argument("--container-key", "--trained-container-key", dest="trained_container_key", metavar="KEY",
                   help="the state_dict to use inside TRAINED (dotted, e.g. state_dict_ema for the EMA weights)")
    p.add_argument("--original-container-key", metavar="KEY", help="the state_dict to use inside ORIGINAL")
    p.add_argument("--frozen-prefixes",
                   help="comma-separated key prefixes of the part you froze: check that it did not change "
                        "(without it: no frozen check, only what changed per module)")
    p.add_argument("--require-frozen", action="store_true",
                   help="with --frozen-prefixes: fail (and store nothing) when a frozen tensor changed")
    p.add_argument("--frozen-atol", type=float, metavar="ATOL",
                   help="largest difference of a frozen tensor still counted as unchanged (bf16 round trips)")
    p.add_argument("--require-complete", action="store_true",
                   help="fail (and store nothing) when a parameter would come from the original, e.g. one shard")
    p.add_argument("--allow-swapped", action="store_true",
                   help="merge even when ORIGINAL and TRAINED look swapped (refused otherwise)")
    p.add_argument("--label", action="append", metavar="KEY=VALUE", help="a label (repeatable)")

    p = _add(sub, "strip", _cmd_strip, common, help="remove wrapper prefixes (module., _orig_mod., ...)")
    p.add_argument("ref", metavar="REF")
    like = p.add_mutually_exclusive_group()
    like.add_argument("--prefix", action="append", help="a prefix to remove (repeatable; default: detect)")
    like.add_argument("--like", metavar="REF", help="rename so that the keys line up with this checkpoint's")
    like.add_argument("--like-architecture", metavar="NAME",
                      help="rename so that the keys line up with this architecture's")
    p.add_argument("--output-format", choices=OUTPUT_FORMATS, default="pth")
    p.add_argument("--container-key", metavar="KEY",
                   help="the state_dict to use inside the checkpoint (dotted); default: the one chosen at upload")
    p.add_argument("--name", help="point this name at the result")

    p = _add(sub, "rm", _cmd_rm, common, help="delete a checkpoint")
    p.add_argument("ref", metavar="REF")
    p.add_argument("--force", action="store_true", help="also remove the names pointing to it")

    arch = sub.add_parser("arch", help="architectures: ls, show, register, rm")
    arch_sub = arch.add_subparsers(dest="arch_command", required=True, metavar="ACTION")
    p = _add(arch_sub, "ls", _cmd_arch_ls, common, help="list architectures")
    p.add_argument("--matches", metavar="REF",
                   help="rank the architectures by how well this stored checkpoint fits them")
    p = _add(arch_sub, "show", _cmd_arch_show, common, help="expected keys, shapes and dtypes")
    p.add_argument("name", metavar="NAME")
    p = _add(arch_sub, "register", _cmd_arch_register, common, help="register a code-free spec")
    p.add_argument("name", metavar="NAME")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--from-checkpoint", metavar="REF", help="take the keys from a stored checkpoint")
    source.add_argument("--keys-file", type=_existing_file, metavar="JSON",
                        help='JSON object: key -> {"shape": [...], "dtype": "float32"}')
    p.add_argument("--description")
    p = _add(arch_sub, "rm", _cmd_arch_rm, common, help="remove a spec-registered architecture")
    p.add_argument("name", metavar="NAME")

    name = sub.add_parser("name", help="names: set, ls, rm")
    name_sub = name.add_subparsers(dest="name_command", required=True, metavar="ACTION")
    p = _add(name_sub, "set", _cmd_name_set, common, help="point a name at a checkpoint")
    p.add_argument("name", metavar="NAME")
    p.add_argument("ref", metavar="REF")
    _add(name_sub, "ls", _cmd_name_ls, common, help="list names")
    p = _add(name_sub, "rm", _cmd_name_rm, common, help="remove a name (the checkpoint stays)")
    p.add_argument("name", metavar="NAME")

    p = _add(sub, "fsck", _cmd_fsck, common, help="check that the store's index and blobs agree (admin token)")
    p.add_argument("--repair", action="store_true",
                   help="unpublish broken artifacts and remove old orphan blobs (what is safe to repair)")
    p.add_argument("--deep", action="store_true", help="also re-hash every blob (reads everything)")

    p = _add(sub, "label", _cmd_label, common, help="set (k=v) and delete (k-) labels of a checkpoint")
    p.add_argument("ref", metavar="REF")
    p.add_argument("changes", nargs="+", metavar="KEY=VALUE|KEY-", help="set a label, or delete it (trailing -)")

    p = _add(sub, "gc", _cmd_gc, common,
             help="apply the retention policy: list what goes (dry run), --apply to delete (admin token)")
    p.add_argument("--apply", action="store_true", help="delete (default: only report what would go)")

    add_serve_parser(sub)
    add_maintenance_parsers(sub)
    return parser


def _run(args: argparse.Namespace, http: Any = None) -> int:
    from service.client.client import CheckpointClient, RetryPolicy
    from service.client.errors import ClientError, ServiceError, VerificationError

    url = getattr(args, "url", None) or os.environ.get("CKPT_URL") or DEFAULT_URL
    token = getattr(args, "token", None) or os.environ.get("CKPT_TOKEN") or None
    timeout = getattr(args, "timeout", None)
    retries = getattr(args, "retries", None)
    args.json = getattr(args, "json", False)
    handler: Handler = args.handler
    kwargs: dict[str, Any] = {"token": token}
    if http is not None:
        kwargs["http"] = http
    if timeout is not None:
        kwargs["timeout"] = timeout
    if retries is not None:
        kwargs["retry"] = RetryPolicy(attempts=max(1, retries))
    try:
        with CheckpointClient(url if http is None else None, **kwargs) as client:
            code = handler(client, args)
            sys.stdout.flush()  # a closed pipe (`ckpt ... | head`) shows up here, not at interpreter exit
            return code
    except VerificationError as exc:
        _print_verification_failure(exc)
        if args.json:
            _emit_json({"error": exc.problem})
        return 1
    except ServiceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        hint = _hint(exc, args)
        if hint:
            print(f"hint: {hint}", file=sys.stderr)
        if args.json:
            _emit_json({"error": exc.problem})
        return 1
    except ClientError as exc:
        print(f"error: {exc}", file=sys.stderr)
        if args.json:
            _emit_json({"error": {"title": exc.title, "detail": str(exc), **exc.extensions}})
        return 1
    except (UsageError, ValueError) as exc:
        print(f"ckpt: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        raise  # main() ends quietly
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def main(argv: Sequence[str] | None = None, *, http: Any = None) -> int:
    """Entry point of the `ckpt` console script.

    Args:
        argv: The arguments (default `sys.argv[1:]`).
        http: An `httpx.Client` to talk through instead of `--url` (tests pass the app's TestClient).

    Returns:
        The exit code: 0 ok, 1 failed operation, 2 usage.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: 2 on a usage error, 0 after --help
        return exc.code if isinstance(exc.code, int) else 2
    if getattr(args, "handler", None) is None:
        code: int = args.func(args)  # `serve`
        return code
    try:
        return _run(args, http)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`ckpt arch show X | head`): nothing to say, and nothing more to write. Point
        # stdout at /dev/null so that the interpreter's final flush does not complain either.
        devnull = os.open(os.devnull, os.O_WRONLY)
        with contextlib.suppress(OSError, ValueError):
            os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 141  # 128 + SIGPIPE, as a shell reports a process killed by the closed pipe


if __name__ == "__main__":
    sys.exit(main())
