"""`ckpt serve`: start uvicorn on the app. Imported only when the command runs (it pulls in torch)."""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tomllib
from pathlib import Path


def add_serve_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("serve", help="run the service (uvicorn)",
                       description="Run the HTTP service. Flags override CKPT_* environment variables.")
    p.add_argument("--host", help="bind address (default 127.0.0.1, CKPT_HOST)")
    p.add_argument("--port", type=int, help="port (default 8000, CKPT_PORT)")
    p.add_argument("--data-dir", help="artifact directory (default ./data, CKPT_DATA_DIR)")
    p.add_argument("--config", help="TOML file with [architectures.NAME] entries (CKPT_CONFIG)")
    p.add_argument("--workers", type=int, default=1, help="uvicorn worker processes (default 1)")
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=run_serve)


def check_config(value: str) -> tuple[Path | None, str | None]:
    """Resolve a `--config` / CKPT_CONFIG path against the current directory and check that it is usable TOML.

    Args:
        value: The path as given.

    Returns:
        (the absolute path, None), or (None, why the service must not start, naming the resolved path).
    """
    path = Path(value).expanduser().resolve()
    try:
        with path.open("rb") as fh:
            tomllib.load(fh)
    except FileNotFoundError:
        return None, f"config file not found: {path}"
    except IsADirectoryError:
        return None, f"config path is a directory, not a TOML file: {path}"
    except OSError as exc:
        return None, f"cannot read config file {path}: {exc.strerror}"
    except tomllib.TOMLDecodeError as exc:
        return None, f"config file {path} is not valid TOML: {exc}"
    return path, None


def run_serve(args: argparse.Namespace) -> int:
    # A relative --config means relative to where the user stands; the workers may start elsewhere, so it is
    # made absolute here, and a file that is missing or not TOML stops the start instead of a silent registry.
    config = args.config if args.config is not None else os.environ.get("CKPT_CONFIG")
    if config:
        path, problem = check_config(config)
        if problem is not None:
            print(f"ckpt serve: error: {problem}", file=sys.stderr)
            return 2
        args.config = str(path)
    # Flags become CKPT_* variables so that every uvicorn worker process builds the same Settings.
    for flag, env in (("host", "CKPT_HOST"), ("port", "CKPT_PORT"), ("data_dir", "CKPT_DATA_DIR"),
                      ("config", "CKPT_CONFIG")):
        value = getattr(args, flag)
        if value is not None:
            os.environ[env] = str(value)
    import uvicorn
    from pydantic import ValidationError
    from uvicorn.config import LOGGING_CONFIG

    from service.api.app import check_safe_globals
    from service.config import Settings
    from service.errors import InvalidSettings

    # Settings that fail open (an unknown token scope, an allowlist entry that resolves to nothing) stop here,
    # with the setting's name, before uvicorn starts; create_app checks them again in every worker.
    try:
        settings = Settings()
        check_safe_globals(settings.safe_globals)
    except (ValidationError, InvalidSettings) as exc:
        print(f"ckpt serve: invalid settings: {exc}", file=sys.stderr)
        return 2
    settings = Settings()
    # The service's own start-up lines (data directory, architectures, auth, docs URL) go where uvicorn's go.
    log_config = copy.deepcopy(LOGGING_CONFIG)
    level = args.log_level.upper()
    level = level if level in ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG") else "DEBUG"  # uvicorn's "trace"
    log_config["loggers"]["ckpt"] = {"handlers": ["default"], "level": level, "propagate": False}
    uvicorn.run("service.api.app:create_app", factory=True, host=settings.host, port=settings.port,
                workers=args.workers, log_level=args.log_level, timeout_graceful_shutdown=10,
                http="service.api.http11:H11Protocol", log_config=log_config)
    return 0
