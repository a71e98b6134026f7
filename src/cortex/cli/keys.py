"""`cortex key new NAME`: makes an API key and the `[[auth.keys]]` entry that admits it.

The entry holds the key's SHA-256, not the key, so cortex.toml needs no secret; the key itself is
printed once, for whoever will use it.
"""

from __future__ import annotations

import argparse
import json
import re
import secrets

from cortex.config.gateway import KEY_NAME_PATTERN, key_sha256

# Recognisable in a leaked file or a secret scanner's rules.
KEY_PREFIX = "ck-"


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def entry(name: str, key: str, models: list[str], admin: bool) -> str:
    lines = [
        "[[auth.keys]]",
        f"name = {json.dumps(name)}",
        f'key_sha256 = "{key_sha256(key)}"',
        f"models = [{', '.join(json.dumps(m) for m in models)}]",
    ]
    if admin:
        lines.append("admin = true")
    return "\n".join(lines)


def _new(args: argparse.Namespace) -> int:
    if not re.match(KEY_NAME_PATTERN, args.name):
        raise SystemExit(f"cortex key new: `{args.name}` is not a key name: letters, digits and _.@- (64 at most)")
    key = new_key()
    print(f"# The key, for its user (shown this once):\n{key}\n")
    print(f"# For the gateway's cortex.toml:\n{entry(args.name, key, args.models or ['*'], args.admin)}")
    return 0


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    key = sub.add_parser("key", help="make API keys")
    actions = key.add_subparsers(dest="action", required=True)
    new = actions.add_parser("new", help="print a new key and its [[auth.keys]] entry")
    new.add_argument("name", help="names the key in logs and errors")
    new.add_argument("--model", dest="models", action="append", help="a model id, alias or pattern it may use (repeat)")
    new.add_argument("--admin", action="store_true", help="also an admin key")
    new.set_defaults(func=_new)
