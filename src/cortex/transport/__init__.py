"""NATS transport: the only part of cortex that imports `nats`."""
