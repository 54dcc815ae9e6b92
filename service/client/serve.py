"""`ckpt serve`: start uvicorn on the app. Imported only when the command runs (it pulls in torch)."""

from __future__ import annotations

import argparse
import os


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


def run_serve(args: argparse.Namespace) -> int:
    # Flags become CKPT_* variables so that every uvicorn worker process builds the same Settings.
    for flag, env in (("host", "CKPT_HOST"), ("port", "CKPT_PORT"), ("data_dir", "CKPT_DATA_DIR"),
                      ("config", "CKPT_CONFIG")):
        value = getattr(args, flag)
        if value is not None:
            os.environ[env] = str(value)
    import sys

    import uvicorn
    from pydantic import ValidationError

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
    uvicorn.run("service.api.app:create_app", factory=True, host=settings.host, port=settings.port,
                workers=args.workers, log_level=args.log_level, timeout_graceful_shutdown=10,
                http="service.api.http11:H11Protocol")
    return 0
