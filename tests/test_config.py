"""Config files: the shipped examples load, and env vars override them."""

from __future__ import annotations

from pathlib import Path

import pytest

from cortex.config import gateway as cortex_config
from cortex.config.loading import ConfigError
from cortex.protocol.catalogue import Catalogue
from neuron import config as neuron_config

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def test_example_gateway_config_loads() -> None:
    settings = cortex_config.load(DEPLOY / "cortex.toml")
    assert settings.gateway.listen == "0.0.0.0:31313"
    assert len(settings.nats.servers) == 3


def test_example_neuron_config_loads_and_its_default_model_is_in_the_example_catalogue() -> None:
    settings = neuron_config.load(DEPLOY / "neuron.toml")
    catalogue = Catalogue.load(DEPLOY / "models.toml")
    assert settings.node == "gpu-a"
    assert all(catalogue.resolve(name) for name in settings.default_models)


def test_env_overrides_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEURON_MAX_BATCH", "9")
    monkeypatch.setenv("NEURON_NATS__SERVERS", '["nats://elsewhere:4222"]')
    settings = neuron_config.load(DEPLOY / "neuron.toml")
    assert settings.max_batch == 9
    assert settings.nats.servers == ["nats://elsewhere:4222"]


def test_env_vars_of_the_admin_commands_are_not_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CORTEX_URL", "http://gateway.internal:31313")
    monkeypatch.setenv("CORTEX_ADMIN_KEY", "0123456789abcdef")
    monkeypatch.setenv("CORTEX_LOG_FORMAT", "json")
    assert cortex_config.load(None).log_format == "json"  # a real setting still applies


def test_a_mistyped_env_var_is_refused_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CORTEX_NATS_PASSWORD", "secret")  # CORTEX_NATS__PASSWORD was meant
    with pytest.raises(ConfigError, match="nats_password"):
        cortex_config.load(None)


def test_bad_value_names_the_file_and_field(tmp_path: Path) -> None:
    path = tmp_path / "neuron.toml"
    path.write_text('max_batch = "lots"\n')
    with pytest.raises(ConfigError, match=r"neuron\.toml: `max_batch`"):
        neuron_config.load(path)


def test_unknown_field_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "cortex.toml"
    path.write_text('[gateway]\nlisten = "127.0.0.1:1"\nlisten_port = 3\n')
    with pytest.raises(ConfigError, match=r"gateway\.listen_port"):
        cortex_config.load(path)


def test_an_empty_env_var_is_an_empty_string_and_bad_json_names_the_variable(monkeypatch) -> None:
    monkeypatch.setenv("CORTEX_GATEWAY__METRICS_LISTEN", "")
    assert cortex_config.load(None).gateway.metrics_listen == ""
    monkeypatch.setenv("CORTEX_AUTH__ADMIN_KEYS", "[oops")
    with pytest.raises(ConfigError, match="env var CORTEX_AUTH__ADMIN_KEYS: not valid JSON"):
        cortex_config.load(None)


def test_an_empty_or_short_admin_key_is_refused(monkeypatch) -> None:
    monkeypatch.setenv("CORTEX_AUTH__ADMIN_KEYS", '[""]')
    with pytest.raises(ConfigError, match=r"`auth\.admin_keys\.0`: String should have at least 16 characters"):
        cortex_config.load(None)


def test_an_api_key_needs_exactly_one_of_key_and_key_sha256(tmp_path: Path) -> None:
    path = tmp_path / "cortex.toml"
    path.write_text('[[auth.keys]]\nname = "team-a"\nmodels = ["smollm2"]\n')
    with pytest.raises(ConfigError, match="key `team-a`: set exactly one of `key` and `key_sha256`"):
        cortex_config.load(path)


def test_two_api_keys_with_one_name_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "cortex.toml"
    entry = '[[auth.keys]]\nname = "team-a"\nkey = "0123456789abcdef-{}"\n'
    path.write_text(entry.format(1) + entry.format(2))
    with pytest.raises(ConfigError, match=r"two \[\[auth\.keys\]\] share the name team-a"):
        cortex_config.load(path)


def test_one_key_in_two_entries_is_refused_without_printing_it(tmp_path: Path) -> None:
    path = tmp_path / "cortex.toml"
    key = "0123456789abcdef-same"
    path.write_text(f'[[auth.keys]]\nname = "a"\nkey = "{key}"\n\n[[auth.keys]]\nname = "b"\nkey = "{key}"\n')
    with pytest.raises(ConfigError, match="`b` has the same key as `a`") as err:
        cortex_config.load(path)
    assert key not in str(err.value)
