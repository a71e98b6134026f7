"""cortex: one OpenAI-compatible endpoint in front of a fleet of model-serving machines.

Packages, each importing only those listed after it (pyproject's [tool.importlinter] keeps it so):
`cli` (the `cortex` command), `devstack` (`cortex up`), `gateway` (the HTTP API), `fleet_report`
(the fleet's health document), `placement` (where jobs go) and `dialects` (API shapes, pure),
`transport` (NATS: the only importer of nats-py), `config`, `telemetry`, and `protocol` (the wire
contract the neuron shares).
"""

__version__ = "0.1.0"
