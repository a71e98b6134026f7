"""Runtime pins in KV `cortex_pins`: models an operator asked a node to keep loaded.

Key `<node>.<model_key>`, value the ModelSpec; each neuron watches its own keys and loads what
they name. In a gateway this is the one owner of the bucket: the admin API pins and unpins
through it, and the fleet report reads its mirror of every pin (catalogue `pinned_on` pins live
in models.toml, not here).
"""

from __future__ import annotations

from cortex.protocol.messages import ModelSpec
from cortex.protocol.subjects import Subjects
from cortex.transport.connection import Connection
from cortex.transport.kv import Bucket, pins_bucket
from cortex.transport.watch import watch_bucket


class Pins:
    """Writes pins and mirrors them. `follow()` keeps the mirror (run it under `keep_watching`)."""

    def __init__(self, bucket: Bucket, connection: Connection, subjects: Subjects, *, replicas: int) -> None:
        self._bucket = bucket
        self._connection = connection
        self._subjects = subjects
        self._replicas = replicas
        self._values: dict[str, bytes] = {}

    @classmethod
    async def open(cls, connection: Connection, subjects: Subjects, *, replicas: int) -> Pins:
        """Opens (creates, on first use) the bucket: a gateway that cannot fails its start here."""
        return cls(await pins_bucket(connection, replicas=replicas), connection, subjects, replicas=replicas)

    @property
    def values(self) -> dict[str, bytes]:
        """The bucket as the watch last saw it: key -> ModelSpec JSON (read it, do not change it)."""
        return self._values

    async def pin(self, node: str, spec: ModelSpec) -> None:
        key = self._subjects.pin_key(node, spec.id)
        await self._bucket.put(key, spec.to_bytes(), what=f"pinning {spec.id} on {node}")

    async def unpin(self, node: str, model_id: str) -> None:
        key = self._subjects.pin_key(node, model_id)
        await self._bucket.delete(key, what=f"unpinning {model_id} on {node}")

    async def follow(self) -> None:
        """Mirrors the bucket until the watch breaks. Reopens it first (and so writes go to the
        bucket as it is now): a NATS server may have come back empty."""
        self._bucket = bucket = await pins_bucket(self._connection, replicas=self._replicas)
        values: dict[str, bytes] = {}
        async for update in watch_bucket(bucket):
            if update is None:
                self._values = values  # a (re)started watch has replayed every key: swap in whole
            elif update[1] is None:
                values.pop(update[0], None)
            else:
                values[update[0]] = update[1]
