"""`python -m bench [name] [options]`: runs one benchmark and prints its table; `throughput` (the
default) is the suite that compares the gateway, the engine and llama.cpp side by side."""

from __future__ import annotations

import sys

from bench import chaos, coldstart, constrained, engines, fleet_sim, node, prefix, quickstart, throughput

BENCHMARKS = {
    "throughput": throughput.main,
    "engines": engines.main,
    "quickstart": quickstart.main,
    "coldstart": coldstart.main,
    "constrained": constrained.main,
    "prefix": prefix.main,
    "node": node.main,
    "chaos": chaos.main,
    "fleet": fleet_sim.main,
}


def main() -> None:
    args = sys.argv[1:]
    name = args.pop(0) if args and not args[0].startswith("-") else "throughput"
    if name not in BENCHMARKS:
        sys.exit(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    BENCHMARKS[name](args)


if __name__ == "__main__":
    main()
