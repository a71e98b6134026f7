"""The neuron's control plane: a nats.micro service per node."""
