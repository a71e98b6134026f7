"""neuron: the per-machine daemon that loads models and runs inference jobs from NATS.

Of cortex it imports only the wire contract (`cortex.protocol`), the transport, telemetry and the
shared parts of `cortex.config`; its own packages are layered (pyproject's [tool.importlinter]).
"""

__version__ = "0.1.0"
