"""Load without a client library in the way: raw HTTP/1.1 keep-alive connections on asyncio
streams, and a NATS client that sends jobs straight to the engine's subject."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import nats
from nats.aio.msg import Msg

from cortex.protocol.messages import InferenceJob


@dataclass
class Timing:
    total_s: float
    first_s: float | None  # the first token (streams only)
    tokens: int


class HttpConnection:
    """One keep-alive connection; `post` sends a request and reads the whole answer."""

    def __init__(self, host: str, port: int) -> None:
        self._host, self._port = host, port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._reader is None or self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(self._host, self._port)
        return self._reader, self._writer

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._reader = self._writer = None

    async def post(
        self, path: str, body: bytes, tokens: Callable[[bytes], int] = lambda _: 0, arrivals: list[float] | None = None
    ) -> Timing:
        """POSTs `body`; counts the tokens in the answer (`tokens` of each piece, or the usage a stream
        ends with, which also counts tokens that came together in one piece) and times the first.
        `arrivals`: gets the time of each piece that carries tokens."""
        request = (
            b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
            % (path.encode(), self._host.encode(), len(body))
            + body
        )
        for _ in range(2):  # a keep-alive connection the server closed while idle: open a new one, once
            reader, writer = await self._connect()
            sent = time.perf_counter()
            writer.write(request)
            try:
                status = await reader.readline()
            except ConnectionError:
                status = b""
            if status:
                break
            await self.close()
        if not status.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"{path}: {status!r}")
        length, chunked = 0, False
        while (line := await reader.readline()) != b"\r\n":
            name, _, value = line.partition(b":")
            if name.lower() == b"content-length":
                length = int(value)
            elif name.lower() == b"transfer-encoding" and b"chunked" in value:
                chunked = True
        first, count, used = None, 0, None
        if not chunked:
            count = tokens(await reader.readexactly(length))
        else:
            while size := int((await reader.readline()).split(b";")[0], 16):
                piece = await reader.readexactly(size + 2)
                if n := tokens(piece):
                    now = time.perf_counter()
                    count += n
                    first = first or now - sent
                    if arrivals is not None:
                        arrivals.append(now)
                if usage := _COMPLETION_TOKENS.search(piece):
                    used = int(usage[1])
            await reader.readline()
        return Timing(time.perf_counter() - sent, first, count if used is None else used)


class DirectClient:
    """Jobs published straight to the engine's subject, answers read from one multiplexed inbox."""

    def __init__(self, nc: nats.NATS) -> None:
        self._nc = nc
        self._prefix = f"_INBOX.bench.{uuid.uuid4().hex}"
        self._waiting: dict[str, asyncio.Queue[bytes]] = {}
        self._ids = itertools.count()

    @classmethod
    async def connect(cls, url: str) -> DirectClient:
        client = cls(await nats.connect(url, name="bench direct"))
        await client._nc.subscribe(f"{client._prefix}.*", cb=client._on_msg)
        return client

    async def _on_msg(self, msg: Msg) -> None:
        queue = self._waiting.get(msg.subject)
        if queue is not None:
            queue.put_nowait(msg.data)

    async def run(self, subject: str, make_job: Callable[[str], InferenceJob]) -> Timing:
        inbox = f"{self._prefix}.{next(self._ids)}"
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        self._waiting[inbox] = queue
        sent = time.perf_counter()
        first, tokens = None, 0
        try:
            await self._nc.publish(subject, make_job(uuid.uuid4().hex).to_bytes(), reply=inbox)
            while data := await queue.get():
                if b'"type":"delta"' in data:
                    counted = _DELTA_TOKENS.search(data)
                    tokens += int(counted[1]) if counted else 1
                    first = first or time.perf_counter() - sent
        finally:
            del self._waiting[inbox]
        return Timing(time.perf_counter() - sent, first, tokens)

    async def close(self) -> None:
        await self._nc.close()


async def closed_loop(concurrency: int, count: int, one: Callable[[int], object]) -> tuple[list[Timing], float]:
    """`count` calls of `one(worker)`, `concurrency` at a time; the timings and the wall time."""
    timings: list[Timing] = []
    remaining = itertools.count()

    async def worker(i: int) -> None:
        while next(remaining) < count:
            timings.append(await one(i))  # type: ignore[misc]

    started = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return timings, time.perf_counter() - started


_CONTENT = re.compile(rb'"content": ?"[^"]')
_DELTA_TOKENS = re.compile(rb'"tokens": ?(\d+)')
_COMPLETION_TOKENS = re.compile(rb'"completion_tokens": ?(\d+)')


def content_tokens(data: bytes) -> int:
    """Streamed OpenAI chunks carrying text (a token each, unless several came at once: `post` then
    counts by the usage at the end of the stream)."""
    return len(_CONTENT.findall(data))


def chat_body(model: str, max_tokens: int, stream: bool, prompt: str = "Say something.", **extra: object) -> bytes:
    messages = [{"role": "user", "content": prompt}]
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "stream": stream, **extra}
    if stream:
        body.setdefault("stream_options", {"include_usage": True})
    return json.dumps(body).encode()
