"""The wire contract between gateways and neurons: the only part of cortex that neuron imports."""
