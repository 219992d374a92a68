"""``actserve serve`` (also ``python -m service``) and ``actserve bench``."""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
from pathlib import Path

from pydantic import ValidationError

from service import __version__, listeners, malloc_tuning
from service.cli_flags import EXPLICIT_NONE, add_settings_flags, overrides
from service.observability import logs
from service.settings import Settings


def load_settings(flags: dict) -> Settings:
    """Environment variables, then the flags given (``None``: not given) on top."""
    given = {k: (None if v is EXPLICIT_NONE else v) for k, v in flags.items() if v is not None}
    try:
        return Settings(**given)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            name = ".".join(str(p) for p in err["loc"]) or "settings"
            lines.append(f"  {name} (ACTSERVE_{name.upper()}): {err['msg']}")
        raise SystemExit("actserve: invalid settings\n" + "\n".join(lines)) from None


def serve(settings: Settings) -> int:
    from service.http.app import create_app
    from service.http.server import DrainingServer, uvicorn_config

    logs.configure(settings)
    trouble = listeners.problem(settings)
    if trouble:
        return _fail(trouble)
    if settings.worker_count > 1:  # a supervisor and N worker processes (service/process)
        from service.process.supervisor import supervise

        return supervise(settings)
    malloc_tuning.tune(settings.malloc_keep_mib)  # before the first large buffer
    try:
        app = create_app(settings)
    except RuntimeError as exc:  # e.g. a CUDA device asked for where there is none
        return _fail(str(exc))
    server = DrainingServer(uvicorn_config(app, settings))
    server.run()
    return 0 if server.started else 1


def _fail(problem: str) -> int:
    """A start-up failure: one line in the log's format, exit status 1, no traceback."""
    logging.getLogger("actserve").error("actserve cannot start: %s", problem)
    return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="actserve", description="Batched activation server")
    parser.add_argument("--version", action="version", version=f"actserve {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p_serve = sub.add_parser(
        "serve", help="run the HTTP server", description="Run the HTTP server. Each setting comes "
        "from its flag, else its environment variable, else its default.")
    add_settings_flags(p_serve)
    p_bench = sub.add_parser("bench", help="run the benchmark sweep (see loadtest/)",
                             add_help=False)  # --help goes to the sweep's own parser
    p_bench.add_argument("rest", nargs=argparse.REMAINDER)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)  # bench's options belong to the sweep
    if args.command == "serve" and unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command == "serve":
        return serve(load_settings(overrides(args)))
    return _bench(unknown + args.rest)


def _bench(args: list[str]) -> int:
    """``python -m loadtest.bench`` in a child process, run from the checkout: loadtest/ is
    not installed with the package, it lives beside service/ in a checkout."""
    root = Path(__file__).resolve().parents[1]
    if not (root / "loadtest" / "bench.py").is_file():
        raise SystemExit("actserve bench runs from a checkout (loadtest/ beside service/)")
    return subprocess.call([sys.executable, "-m", "loadtest.bench", *args], cwd=root)


if __name__ == "__main__":
    sys.exit(main())
