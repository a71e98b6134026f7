"""NATS subject and KV names. Every name cortex puts on the wire is built here.

`model_key` turns a model id into one subject token (and a valid KV key). Letters,
digits and `-` stay as they are; every other byte becomes `_XX`, its two-digit
uppercase hex code. `_` itself is escaped (`_5F`), so the encoding is injective and
an operator can compute it by hand:

    HuggingFaceTB/SmolLM2-135M-Instruct  ->  HuggingFaceTB_2FSmolLM2-135M-Instruct
    qwen2.5:7b                           ->  qwen2_2E5_3A7b
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_SAFE = re.compile(rb"[A-Za-z0-9-]")

DEFAULT_PREFIX = "cortex"
NODES_BUCKET = "cortex_nodes"
PLACEMENT_BUCKET = "cortex_placement"
PINS_BUCKET = "cortex_pins"
RESPONSES_BUCKET = "cortex_responses"
JOB_QUEUE_GROUP = "neurons"
CONTROL_SERVICE = "neuron"


def model_key(model_id: str) -> str:
    if not model_id:
        raise ValueError("model id must not be empty")
    out = []
    for byte in model_id.encode():
        ch = bytes([byte])
        out.append(ch.decode() if _SAFE.fullmatch(ch) else f"_{byte:02X}")
    return "".join(out)


def model_id_from_key(key: str) -> str:
    out = bytearray()
    i = 0
    while i < len(key):
        if key[i] == "_":
            out.append(int(key[i + 1 : i + 3], 16))
            i += 3
        else:
            out.append(ord(key[i]))
            i += 1
    return out.decode()


# Node names are used as subject tokens and KV keys as they are.
NODE_NAME_PATTERN = r"^[A-Za-z0-9_-]+$"

# In KV cortex_nodes, a node's heartbeat is under its name (one token: watch `*` for heartbeats
# alone) and its memory estimates, written when they change, under `<node>.estimates`.
HEARTBEAT_KEYS = "*"
_ESTIMATES_SUFFIX = ".estimates"


def estimates_key(node: str) -> str:
    return node + _ESTIMATES_SUFFIX


def estimates_node(key: str) -> str | None:
    """The node whose estimates the key holds; None for any other key (a heartbeat)."""
    return key.removesuffix(_ESTIMATES_SUFFIX) if key.endswith(_ESTIMATES_SUFFIX) else None


@dataclass(frozen=True)
class Subjects:
    """Subject builders for one deployment prefix (`cortex` unless configured)."""

    prefix: str = DEFAULT_PREFIX

    def infer(self, model_id: str) -> str:
        return f"{self.prefix}.infer.{model_key(model_id)}"

    def infer_node(self, model_id: str, node: str) -> str:
        """A job for one node, under the node's own subjects: NATS permissions can then give each
        node `<prefix>.node.<node>.>` alone, and no subscription under `<prefix>.infer.` (where any
        node may take un-addressed jobs) can catch another node's addressed ones."""
        return f"{self.prefix}.node.{node}.infer.{model_key(model_id)}"

    def control_group(self, node: str) -> str:
        return f"{self.prefix}.node.{node}"

    def control(self, node: str, verb: str) -> str:
        return f"{self.prefix}.node.{node}.{verb}"

    def cancel_any(self) -> str:
        """Broadcast cancel: every neuron drops the job if it has it (used when the node is unknown)."""
        return f"{self.prefix}.cancel"

    def pin_key(self, node: str, model_id: str) -> str:
        """Key in KV cortex_pins."""
        return f"{node}.{model_key(model_id)}"

    def events(self, kind: str) -> str:
        return f"{self.prefix}.events.{kind}"

    def job_lost(self, node: str) -> str:
        """`job_lost`, per node: NATS permissions let each node publish only its own, since a
        gateway fails the job it names."""
        return f"{self.prefix}.events.job_lost.{node}"

    def node_event(self, kind: str, node: str) -> str:
        """Where a node publishes a fleet event of `kind`."""
        return self.job_lost(node) if kind == "job_lost" else self.events(kind)
