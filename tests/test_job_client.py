"""The gateway's JobClient hears `job_lost` only from the node running the job."""

from __future__ import annotations

import pytest

from cortex.protocol.errors import TransportError
from cortex.protocol.messages import Accepted, Delta, FleetEvent, InferenceJob
from cortex.protocol.subjects import Subjects
from cortex.transport.connection import connect
from cortex.transport.job_client import JobClient

MINIMAL_JOB = '{"model": "test/x", "messages": [{"role": "user", "content": "Hello"}], "sampling": {"max_tokens": 4}}'


async def test_job_lost_counts_only_from_the_node_running_the_job(nats_url: str) -> None:
    subjects = Subjects()
    connection = await connect([nats_url], "test gateway")
    nc = connection.client
    client = await JobClient.open(connection, subjects)
    job = InferenceJob.model_validate_json(MINIMAL_JOB)
    replies: list[str] = []

    async def node_b(msg) -> None:
        replies.append(msg.reply)
        await nc.publish(msg.reply, Accepted(job_id=job.job_id, seq=0, node="b", device="cpu").to_bytes())

    async def lost(node: str) -> None:
        event = FleetEvent(kind="job_lost", node=node, model=job.model, job_id=job.job_id, reason="reply_refused")
        await nc.publish(subjects.job_lost(node), event.to_bytes())
        await nc.flush()

    try:
        await nc.subscribe(subjects.infer_node(job.model, "b"), cb=node_b)
        await nc.flush()
        stream = await client.submit(job, "b")
        assert isinstance(await stream.next(), Accepted)
        await lost("a")  # an earlier try of the same job on another node: not this one's business
        await nc.publish(replies[0], Delta(job_id=job.job_id, seq=1, text="hi", tokens=1).to_bytes())
        assert isinstance(await stream.next(), Delta)
        await lost("b")
        with pytest.raises(TransportError, match="node b can no longer send job"):
            await stream.next()
    finally:
        await client.aclose()
        await connection.aclose()
