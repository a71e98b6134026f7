"""`python -m bench <name>`: runs one benchmark and prints its table."""

from __future__ import annotations

import sys

from bench import coldstart, quickstart

BENCHMARKS = {"quickstart": quickstart.main, "coldstart": coldstart.main}


def main() -> None:
    name = sys.argv[1] if len(sys.argv) > 1 else "quickstart"
    if name not in BENCHMARKS:
        sys.exit(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    BENCHMARKS[name](sys.argv[2:])


if __name__ == "__main__":
    main()
