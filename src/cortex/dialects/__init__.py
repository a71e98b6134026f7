"""Dialect translation: pure functions between HTTP API shapes and the job protocol. No I/O."""
