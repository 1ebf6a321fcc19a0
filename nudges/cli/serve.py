"""`nudges serve`: the CDS Hooks service."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def register(sub: Any) -> None:
    serve = sub.add_parser("serve", help="run the CDS Hooks service")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--config", type=Path, help="YAML settings file")
    serve.add_argument("--rules", type=Path, help="rules directory (default: bundled rules/)")
    serve.add_argument("--database-url", dest="database_url")
    serve.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from ..api.app import create_app
    from ..errors import ConfigError
    from ..logs import configure
    from ..rules.compiler import load_ruleset
    from ..settings import load_settings

    try:
        settings = load_settings(args.config, host=args.host, port=args.port, rules=args.rules,
                                 database_url=args.database_url)
        configure(settings.log_level, settings.log_format)
        result = load_ruleset(settings.rules, settings.site_valuesets)
        if result.ruleset is None:
            for problem in result.problems:
                print(problem, file=sys.stderr)
            print(f"refusing to start: the rule set in {settings.rules} has problems", file=sys.stderr)
            return 1
        app = create_app(settings)
    except ConfigError as exc:
        print(f"refusing to start: {exc.diagnostics}", file=sys.stderr)
        return 2
    uvicorn.run(app, host=settings.host, port=settings.port, log_config=None, access_log=False,
                proxy_headers=False, server_header=False,
                ssl_certfile=str(settings.tls_certfile) if settings.tls_certfile else None,
                ssl_keyfile=str(settings.tls_keyfile) if settings.tls_keyfile else None)
    return 0
