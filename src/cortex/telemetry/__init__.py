"""What the gateway and the neuron tell operators: logs, metrics, health.

Imports nothing else of cortex, so both sides (and `cortex.config`, for the log format) may use it.
"""
