"""`neuron serve`: run the daemon."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cortex.config.loading import ConfigError
from cortex.protocol.catalogue import CatalogueError
from cortex.protocol.errors import CortexError
from cortex.telemetry import logs
from neuron import config


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="neuron", description="cortex model-serving daemon")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="connect to NATS and serve models")
    serve.add_argument("--config", type=Path, help="neuron.toml (env vars NEURON_... override it)")
    serve.add_argument("--node", help="node name (default: the host name)")
    serve.add_argument("--nats", help="NATS server URL, overrides [nats] servers")
    serve.add_argument("--models-config", type=Path, help="models.toml catalogue")
    serve.add_argument("--model", action="append", dest="models", help="load this model at start (repeatable)")
    serve.add_argument("--heartbeat-interval", type=float)
    serve.add_argument("--memory-mb", type=int, help="memory per device models may use (default: all but the reserve)")
    serve.add_argument("--metrics-listen", help="host:port of /metrics and /healthz, overrides metrics_listen")
    serve.add_argument("--log-format", choices=["text", "json"], help="overrides log_format")
    args = parser.parse_args(argv)

    try:
        settings = config.load(
            args.config,
            node=args.node,
            models_config=args.models_config,
            default_models=args.models,
            heartbeat_interval=args.heartbeat_interval,
            memory_mb=args.memory_mb,
            metrics_listen=args.metrics_listen,
            log_format=args.log_format,
            **{"nats.servers": [args.nats] if args.nats else None},
        )
    except ConfigError as exc:
        sys.exit(f"neuron: {exc}")
    logs.configure(settings.log_level, settings.log_format, f"neuron {settings.node}")
    from neuron.daemon import run  # torch is imported only once the config is valid
    from neuron.devices.discovery import DeviceError

    try:
        run(settings)
    except (CortexError, CatalogueError, DeviceError) as exc:
        sys.exit(f"neuron: {exc}")


if __name__ == "__main__":
    main()
