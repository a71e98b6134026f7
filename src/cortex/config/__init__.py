"""Configuration: one home for the settings files and how they are read.

- `loading`: TOML file, then env vars, then CLI flags (`load_settings`, `ConfigError`);
- `nats_settings`: the `[nats]` section every NATS client shares (gateway, neuron, `cortex status`);
- `addresses`: listen addresses (`split_host_port`, `is_loopback`);
- `gateway`: cortex.toml, the gateway's settings and API keys.

The neuron's own neuron.toml (`neuron.config`) is built from the first three; nothing here imports
the gateway, the transport or the neuron.
"""
