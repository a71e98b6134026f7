"""A synthetic engine: a node that holds one model, with no model behind it.

It speaks the real protocol (a heartbeat in KV `cortex_nodes`, jobs on the model's subjects,
`accepted`, `delta`s, `done`, the end marker), emits exactly `max_tokens` tokens per job, one
NATS message each, `interval` seconds apart (0: as fast as it can), so what is measured is the
transport and the gateway, not a model.

    python -m bench.synthetic --nats nats://127.0.0.1:4222 --model synthetic/echo [--interval 0]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import time

import nats
from nats.aio.msg import Msg

from cortex import __version__
from cortex.protocol.messages import DeviceInfo, Heartbeat, InferenceJob, ModelState, ModelStatus
from cortex.protocol.subjects import JOB_QUEUE_GROUP, NODES_BUCKET, Subjects, model_key
from cortex.transport.connection import connect
from cortex.transport.kv import nodes_bucket

TOKEN = "tok "


class SyntheticEngine:
    def __init__(self, nc: nats.NATS, node: str, model: str, interval: float) -> None:
        self._nc = nc
        self._node = node
        self._model = model
        self._interval = interval
        self._started = time.time()
        self._tasks: set[asyncio.Task[None]] = set()

    def heartbeat(self) -> Heartbeat:
        cpu = DeviceInfo(id="cpu", kind="cpu", name="synthetic", total_mb=1024, free_mb=1024)
        status = ModelStatus(id=self._model, key=model_key(self._model), state=ModelState.ready, device="cpu")
        return Heartbeat(
            node=self._node,
            version=__version__,
            started_at=self._started,
            sent_at=time.time(),
            interval_s=1.0,
            max_batch=100_000,
            max_queue=0,
            devices=[cpu],
            models=[status],
        )

    async def on_job(self, msg: Msg) -> None:
        task = asyncio.create_task(self._answer(msg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, msg: Msg) -> None:
        job = InferenceJob.model_validate_json(msg.data)
        job_id, reply, n = job.job_id, msg.reply, job.sampling.max_tokens
        # Built by hand: the engine must outrun the gateway it measures.
        head = f'{{"job_id":"{job_id}","type":"delta","text":"{TOKEN}","tokens":1,"seq":'
        accepted = {"job_id": job_id, "seq": 0, "type": "accepted", "node": self._node, "device": "cpu"}
        await self._nc.publish(reply, json.dumps(accepted).encode())
        started = time.perf_counter()
        for seq in range(1, n + 1):
            await self._nc.publish(reply, f"{head}{seq}}}".encode())
            if self._interval:
                await asyncio.sleep(self._interval)
        ms = (time.perf_counter() - started) * 1000
        done = {
            "job_id": job_id,
            "seq": n + 1,
            "type": "done",
            "finish_reason": "length",
            "usage": {"prompt_tokens": 8, "completion_tokens": n},
            "timings": {"queue_ms": 0, "prefill_ms": 0, "decode_ms": ms, "ttft_ms": 0},
        }
        await self._nc.publish(reply, json.dumps(done).encode())
        await self._nc.publish(reply, b"")


async def serve(nats_url: str, node: str, model: str, interval: float, stop: asyncio.Event) -> None:
    connection = await connect([nats_url], f"synthetic {node}")
    nc = connection.client
    try:
        kv = await nodes_bucket(connection)
        engine = SyntheticEngine(nc, node, model, interval)
        subjects = Subjects()
        await nc.subscribe(subjects.infer(model), queue=JOB_QUEUE_GROUP, cb=engine.on_job)
        await nc.subscribe(subjects.infer_node(model, node), cb=engine.on_job)
        js = nc.jetstream()
        while not stop.is_set():
            await js.publish(f"$KV.{NODES_BUCKET}.{node}", engine.heartbeat().to_bytes(), msg_ttl=3)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
        await kv.delete(node)
    finally:
        await connection.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nats", required=True)
    parser.add_argument("--node", default="synthetic")
    parser.add_argument("--model", default="synthetic/echo")
    parser.add_argument("--interval", type=float, default=0.0, help="seconds between tokens")
    args = parser.parse_args()

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(args.nats, args.node, args.model, args.interval, stop)

    asyncio.run(run())


if __name__ == "__main__":
    main()
