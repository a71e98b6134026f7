"""Config plumbing shared by gateway and neuron: TOML file, then env vars, then CLI flags.

Env vars are `<PREFIX>_<FIELD>`, with `__` between nested fields:
`NEURON_NATS__SERVERS='["nats://a:4222"]'`, `CORTEX_GATEWAY__LISTEN=0.0.0.0:31313`.
A value that starts with `[` or `{` is read as JSON.
"""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

T = TypeVar("T", bound=BaseModel)


class ConfigError(ValueError):
    pass


# Env vars that share a prefix with the settings but belong to the admin commands (`cortex load
# --url`, ...). Any other unknown one is refused, so that a typo (CORTEX_NATS_PASSWORD for
# CORTEX_NATS__PASSWORD) is an error at start, not a puzzling failure later.
NOT_SETTINGS = frozenset({"CORTEX_URL", "CORTEX_ADMIN_KEY"})


def load_settings(cls: type[T], path: Path | None, env_prefix: str, **overrides: Any) -> T:
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    for name, value in os.environ.items():
        if name.startswith(env_prefix + "_"):
            keys = name[len(env_prefix) + 1 :].lower().split("__")
            if name not in NOT_SETTINGS:
                _set(data, keys, _env_value(name, value))
    for name, value in overrides.items():
        if value is not None:
            _set(data, name.split("."), value)
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        where = str(path) if path else "configuration"
        problems = "; ".join(f"`{'.'.join(str(p) for p in err['loc'])}`: {err['msg']}" for err in exc.errors())
        raise ConfigError(f"{where}: {problems} (env vars {env_prefix}_... apply too)") from None


def _env_value(name: str, value: str) -> Any:
    if not value.startswith(("[", "{")):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as exc:
        raise ConfigError(f'env var {name}: not valid JSON ({exc}); write lists as \'["a", "b"]\'') from None


def _set(data: dict[str, Any], keys: list[str], value: Any) -> None:
    for key in keys[:-1]:
        data = data.setdefault(key, {})
    data[keys[-1]] = value
