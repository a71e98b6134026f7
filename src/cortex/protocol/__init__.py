"""The wire contract between gateways and neurons: messages, subjects, error codes, the catalogue.

It imports nothing else of cortex (import-linter keeps it so). The neuron imports it, and of the
rest of cortex only `cortex.transport`, `cortex.telemetry` and the shared parts of `cortex.config`.
"""
