"""Prefix fingerprints: how a gateway with no tokenizer tells which node holds a job's prompt warm.

A job's conversation is fingerprinted message by message: fingerprint i stands for everything up
to and including message i (with the model and the tools, which templates render first). The
node that ran a job keeps its prompt's KV cache and advertises the fingerprints of what it keeps
(in its heartbeat); a gateway routes a new job to the holder that advertises the longest of the
job's own chain. Both sides compute the chain with this one function, so every gateway agrees.
The exact definition is in schemas/README.md ("Prefix fingerprints").
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from cortex.protocol.messages import InferenceJob

FINGERPRINT_CHARS = 16  # hex: 64 bits, enough to tell apart every prompt a fleet holds


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def prefix_chain(job: InferenceJob) -> list[str]:
    """One fingerprint per message of the job; empty for a raw prompt (nothing to align on)."""
    if job.messages is None:
        return []
    digest = hashlib.sha256(job.model.encode())
    digest.update(b"\x1f" + _canonical([tool.model_dump(mode="json", exclude_none=True) for tool in job.tools or []]))
    chain = []
    for message in job.messages:
        digest.update(b"\x1e" + _canonical(message.model_dump(mode="json", exclude_none=True)))
        chain.append(digest.copy().hexdigest()[:FINGERPRINT_CHARS])
    return chain


def longest_match(chain: list[str], held: frozenset[str] | set[str]) -> int:
    """How many of the chain's messages a holder of `held` has warm (0: none)."""
    for i in range(len(chain) - 1, -1, -1):
        if chain[i] in held:
            return i + 1
    return 0
