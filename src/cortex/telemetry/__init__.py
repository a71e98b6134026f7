"""What the gateway and the neuron tell operators: logs, metrics, health."""
