"""`cortex` command line: up (dev stack), serve (gateway), schemas (wire format), the admin
commands (models, load, unload, pin, unpin; see cli.admin), status, and key (API keys)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from cortex.cli import admin, keys, status
from cortex.config.addresses import is_loopback, split_host_port
from cortex.config.loading import ConfigError
from cortex.devstack.natsserver import NatsServerError
from cortex.protocol.catalogue import DEFAULT_MODEL, CatalogueError
from cortex.telemetry import logs


def _up(args: argparse.Namespace) -> int:
    from cortex.devstack.stack import DevOptions, default_state_dir, run

    logs.configure("INFO" if args.verbose else "WARNING", "text", "cortex")
    opts = DevOptions(
        model=args.model,
        models_config=args.models_config,
        listen=args.listen,
        metrics_listen=args.metrics_listen,
        nats_port=args.nats_port,
        nats_http_port=args.nats_http_port,
        state_dir=args.state_dir or default_state_dir(),
    )
    # SIGTERM (systemd, `timeout`, an IDE's stop button) takes the same clean path as Ctrl-C.
    signal.signal(signal.SIGTERM, lambda *_: signal.raise_signal(signal.SIGINT))
    try:
        return asyncio.run(run(opts))
    except KeyboardInterrupt:
        return 0


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from cortex.config import gateway as gateway_config
    from cortex.gateway.app import build_app

    settings = gateway_config.load(
        args.config,
        models_config=args.models_config,
        log_format=args.log_format,
        **{"gateway.listen": args.listen, "nats.servers": [args.nats] if args.nats else None},
    )
    logs.configure(settings.log_level, settings.log_format, "cortex")
    host, port = split_host_port(settings.gateway.listen)
    if not settings.auth.keys and not is_loopback(host):
        logging.getLogger("cortex").warning(
            "listening on %s with no [[auth.keys]]: anyone who can reach it may use every model "
            "(`cortex key new NAME` makes a key)",
            settings.gateway.listen,
        )
    # log_config=None: uvicorn's own lines go through our handler (JSON too), not its own.
    uvicorn.run(
        build_app(settings),
        host=host,
        port=port,
        log_level="warning",
        log_config=None,
        lifespan="on",
        # SIGTERM: stop accepting, let open streams finish for this long, then cut them (their
        # jobs are cancelled on the nodes as the responses close), then close NATS.
        # uvicorn annotates it `int` but hands it to asyncio.timeout, which takes seconds as a float.
        timeout_graceful_shutdown=settings.gateway.shutdown_timeout,  # type: ignore[arg-type]
    )
    return 0


def _schemas(args: argparse.Namespace) -> int:
    from cortex.protocol import schemas

    if args.check:
        stale = schemas.drift(args.dir)
        if stale:
            print(f"schemas out of date: {', '.join(stale)}; run `cortex schemas`", file=sys.stderr)
            return 1
        print("schemas up to date")
        return 0
    for path in schemas.write(args.dir):
        print(path)
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="cortex", description="LLM fleet gateway over NATS")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="all-in-one dev stack: NATS, one neuron, the gateway")
    up.add_argument("--model", default=DEFAULT_MODEL.id, help="catalogue id or alias to serve")
    up.add_argument("--models-config", type=Path, help="models.toml (default: the built-in catalogue)")
    up.add_argument("--listen", default="127.0.0.1:31313")
    up.add_argument("--metrics-listen", default="127.0.0.1:31314")
    up.add_argument("--nats-port", type=int, default=4222)
    up.add_argument("--nats-http-port", type=int, default=8222)
    up.add_argument("--state-dir", type=Path, help="JetStream store and logs (default ~/.cache/cortex/dev)")
    up.add_argument("-v", "--verbose", action="store_true", help="log gateway activity")
    up.set_defaults(func=_up)

    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", type=Path, help="cortex.toml (env vars CORTEX_... override it)")
    serve.add_argument("--listen", help="host:port, overrides [gateway] listen")
    serve.add_argument("--nats", help="NATS server URL, overrides [nats] servers")
    serve.add_argument("--models-config", type=Path, help="models.toml catalogue")
    serve.add_argument("--log-format", choices=["text", "json"], help="overrides log_format")
    serve.set_defaults(func=_serve)

    schemas = sub.add_parser("schemas", help="write schemas/*.json from the wire models")
    schemas.add_argument("--dir", type=Path, default=Path("schemas"))
    schemas.add_argument("--check", action="store_true", help="exit 1 if the files differ from the code")
    schemas.set_defaults(func=_schemas)

    admin.add_commands(sub)
    status.add_commands(sub)
    keys.add_commands(sub)

    args = parser.parse_args(argv)
    try:
        sys.exit(args.func(args))
    except (ConfigError, CatalogueError, NatsServerError) as exc:
        sys.exit(f"cortex: {exc}")


if __name__ == "__main__":
    main()
