"""neuron: the per-machine daemon that loads models and runs inference jobs from NATS."""

__version__ = "0.1.0"
