"""`nudges serve`: the CDS Hooks service."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def register(sub: Any) -> None:
    serve = sub.add_parser("serve", help="run the CDS Hooks service")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--config", type=Path, help="YAML settings file")
    serve.add_argument("--rules", type=Path, help="rules directory (default: bundled rules/)")
    serve.add_argument("--database-url", dest="database_url")
    serve.add_argument("--log-format", dest="log_format", choices=["json", "text"],
                       help="json lines for collectors (default), or text for people")
    serve.add_argument("--workers", type=int, default=1, metavar="N",
                       help="processes serving on the one port (each a stateless replica over the database)")
    serve.set_defaults(run=run)


WORKER_ARGS = "NUDGES_SERVE_ARGS"  # how worker processes receive the command line of `nudges serve`


def settings_from(args: dict[str, Any]) -> Any:
    from ..settings import load_settings

    config = args.get("config")
    return load_settings(Path(config) if config else None, host=args.get("host"), port=args.get("port"),
                         rules=args.get("rules"), database_url=args.get("database_url"),
                         log_format=args.get("log_format"))


def worker_app() -> Any:
    """The app of one worker process of `nudges serve --workers N`: the same settings as the parent, read
    the same way (flags passed down, the same environment and config file)."""
    import orjson

    from ..api.app import create_app
    from ..logs import configure

    settings = settings_from(orjson.loads(os.environ[WORKER_ARGS]))
    configure(settings.log_level, settings.log_format)
    return create_app(settings)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from ..api.app import create_app
    from ..errors import ConfigError
    from ..logs import configure
    from ..rules.compiler import load_ruleset

    flags = {"config": str(args.config) if args.config else None, "host": args.host, "port": args.port,
             "rules": str(args.rules) if args.rules else None, "database_url": args.database_url,
             "log_format": args.log_format}
    if args.workers < 1:
        print("refusing to start: --workers must be 1 or more", file=sys.stderr)
        return 2
    try:
        settings = settings_from(flags)
        configure(settings.log_level, settings.log_format)
        result = load_ruleset(settings.rules, settings.site_valuesets)
        if result.ruleset is None:
            for problem in result.problems:
                print(problem, file=sys.stderr)
            print(f"refusing to start: the rule set in {settings.rules} has problems", file=sys.stderr)
            return 1
        empty_metrics_folder()  # before any metric opens its file there
        app = create_app(settings)  # every check a worker would make, made once here where it can be reported
    except ConfigError as exc:
        print(f"refusing to start: {exc.diagnostics}", file=sys.stderr)
        return 2
    options: dict[str, Any] = {
        "host": settings.host, "port": settings.port, "log_config": None, "access_log": False,
        "proxy_headers": False, "server_header": False,
        "ssl_certfile": str(settings.tls_certfile) if settings.tls_certfile else None,
        "ssl_keyfile": str(settings.tls_keyfile) if settings.tls_keyfile else None}
    if args.workers == 1:
        uvicorn.run(app, **options)
        return 0
    import orjson

    os.environ[WORKER_ARGS] = orjson.dumps(flags).decode()
    with metrics_folder():
        uvicorn.run("nudges.cli.serve:worker_app", factory=True, workers=args.workers, **options)
    return 0


def empty_metrics_folder() -> None:
    """The metrics files an earlier run left in the operator's PROMETHEUS_MULTIPROC_DIR, removed (one
    worker or several): kept, they add to this run's counts, as prometheus_client warns."""
    from ..metrics import MULTIPROCESS_DIR

    folder = os.environ.get(MULTIPROCESS_DIR)
    for leftover in Path(folder).glob("*.db") if folder else ():
        leftover.unlink(missing_ok=True)


@contextmanager
def metrics_folder() -> Iterator[None]:
    """The workers' metrics files (metrics.py), in a folder of this run's: set before they start, so each
    imports prometheus_client in multiprocess mode; emptied first when the operator names one, as
    prometheus_client asks (files left by an earlier run would add to this one's counts)."""
    from ..metrics import MULTIPROCESS_DIR

    given = os.environ.get(MULTIPROCESS_DIR)
    folder = Path(given) if given else Path(tempfile.mkdtemp(prefix="nudges-metrics-"))
    folder.mkdir(parents=True, exist_ok=True)
    os.environ[MULTIPROCESS_DIR] = str(folder)
    empty_metrics_folder()
    try:
        yield
    finally:
        if not given:
            shutil.rmtree(folder, ignore_errors=True)
