"""Dialect translation: pure functions between HTTP API shapes and the job protocol.

No I/O: nothing here imports the transport, the gateway or an HTTP framework (import-linter keeps it
so); the gateway's routes call these on the way in and out.
"""
