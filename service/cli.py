"""``actserve serve`` (also ``python -m service``) and ``actserve bench``."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pydantic import ValidationError

from service import malloc_tuning
from service.settings import Settings

FLAGS = {
    "host": str, "port": int, "device": str, "max_batch_elements": int,
    "max_batch_requests": int, "max_delay_us": int, "max_queue_requests": int,
    "default_timeout_s": float, "max_request_bytes": int, "torch_threads": int,
    "log_level": str, "workers": str,
}


def load_settings(overrides: dict) -> Settings:
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            name = ".".join(str(p) for p in err["loc"]) or "settings"
            lines.append(f"  {name} (ACTSERVE_{name.upper()}): {err['msg']}")
        raise SystemExit("actserve: invalid settings\n" + "\n".join(lines)) from None


def serve(settings: Settings) -> int:
    from service.http.app import create_app
    from service.http.server import DrainingServer, uvicorn_config

    logging.basicConfig(level=settings.log_level.upper(), format="%(message)s", stream=sys.stderr)
    if settings.worker_count > 1:  # a supervisor and N worker processes (service/process)
        from service.process.supervisor import supervise

        return supervise(settings)
    malloc_tuning.tune(settings.malloc_keep_mib)  # before the first large buffer
    try:
        app = create_app(settings)
    except RuntimeError as exc:  # e.g. a CUDA device asked for where there is none
        raise SystemExit(f"actserve: {exc}") from None
    server = DrainingServer(uvicorn_config(app, settings))
    server.run()
    return 0 if server.started else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="actserve", description="Batched activation server")
    sub = parser.add_subparsers(dest="command", required=True)
    p_serve = sub.add_parser("serve", help="run the HTTP server")
    for name, typ in FLAGS.items():
        p_serve.add_argument("--" + name.replace("_", "-"), dest=name, type=typ, default=None,
                             help=f"overrides ACTSERVE_{name.upper()}")
    p_serve.add_argument("--no-metrics", dest="metrics", action="store_const", const=False,
                         default=None, help="disable Prometheus metrics and /v1/stats")
    p_bench = sub.add_parser("bench", help="run the benchmark sweep (see loadtest/)",
                             add_help=False)  # --help goes to the sweep's own parser
    p_bench.add_argument("rest", nargs=argparse.REMAINDER)
    args, unknown = parser.parse_known_args(argv)  # bench's options belong to the sweep
    if args.command == "serve" and unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command == "serve":
        overrides = {k: getattr(args, k) for k in [*FLAGS, "metrics"]}
        return serve(load_settings(overrides))
    # loadtest/ is not installed with the package: it lives beside service/ in a checkout.
    checkout = str(Path(__file__).resolve().parents[1])
    if checkout not in sys.path:
        sys.path.insert(0, checkout)
    from loadtest.bench import main as bench_main

    return bench_main(unknown + args.rest)


if __name__ == "__main__":
    sys.exit(main())
