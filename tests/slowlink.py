"""A slow link for tests: a TCP relay on another loopback address (127.0.0.2) that holds every
byte for a one-way delay before passing it on, to the hub's ports of the same numbers on
127.0.0.1. A node given the relay's address (its join token's) talks to the hub through it, as
over a long-distance link: every handshake, request and answer takes the delay each way.

(Linux's netem would do this per packet; the kernels the suite runs on may not have it.)
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterable


class SlowLink:
    """Relays ``ports`` from ``host`` to ``target`` with ``delay`` seconds each way."""

    def __init__(self, ports: Iterable[int], delay: float, host: str = "127.0.0.2",
                 target: str = "127.0.0.1") -> None:
        self.ports, self.delay, self.host, self.target = list(ports), delay, host, target
        self.loop = asyncio.new_event_loop()
        self.bytes = 0  # passed on, both ways
        self._servers: list[asyncio.base_events.Server] = []
        self._tasks: set[asyncio.Task[None]] = set()
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self.thread.start()
        if not ready.wait(10):
            raise RuntimeError("the slow link did not start")

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)

        async def serve() -> None:
            for p in self.ports:
                self._servers.append(await asyncio.start_server(
                    lambda r, w, p=p: self._connection(r, w, p), self.host, p))
            ready.set()

        self.loop.run_until_complete(serve())
        self.loop.run_forever()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                          port: int) -> None:
        try:
            up_r, up_w = await asyncio.open_connection(self.target, port)
        except OSError:
            writer.close()
            return
        for r, w in ((reader, up_w), (up_r, writer)):
            task = asyncio.ensure_future(self._pump(r, w))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Bytes in order, each chunk passed on ``delay`` after it came."""
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def later() -> None:
            while True:
                due, data = await queue.get()
                if not data:
                    break
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(data)
                self.bytes += len(data)
                await writer.drain()
            writer.close()

        out = asyncio.ensure_future(later())
        self._tasks.add(out)
        out.add_done_callback(self._tasks.discard)
        try:
            while data := await reader.read(65536):
                queue.put_nowait((time.monotonic() + self.delay, data))
        except OSError:
            pass
        finally:
            queue.put_nowait((time.monotonic() + self.delay, b""))
            try:
                await out
            except OSError:
                pass

    def close(self) -> None:
        async def stop() -> None:
            for s in self._servers:
                s.close()
            tasks = list(self._tasks)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()
