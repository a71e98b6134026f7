"""The `cortex` command line: argument parsing and one module per group of commands.

- `main`: the `cortex` entry point (up, serve, schemas) and the parser that gathers the others;
- `admin`: models, load, unload, pin, unpin (HTTP to a gateway's /admin API);
- `status`: the fleet's health, read straight from NATS;
- `keys`: `cortex key` (API keys for cortex.toml).

The entry points sit above everything else in cortex: nothing in cortex imports `cortex.cli`.
"""
