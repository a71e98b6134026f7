"""Where jobs go: the fleet as seen from heartbeats (`fleet`, `usage`), the pure choice of a node
(`planner`, `policy`: no I/O, import-linter keeps them so), and the KV state behind a choice that
several gateways share (`lease`, `pins`), which they read and write through cortex.transport."""
