"""A raw-socket peer that serves scripted bytes per connection: a hostile upstream or
token endpoint whose every byte on the wire is the test's.

A script is a list of steps, run in order on one connection:

* `READ` — read one request (head, then a Content-Length or chunked body);
* `bytes` — write them as they are;
* a `float` — sleep that long (a stall, a trickle);
* `HOLD` — wait until the peer closes (silence);
* `CLOSE` — close now;
* a callable — given the last request head, returns the bytes to write (an
  endpoint that echoes what it was sent).

When a script runs out, and on connections beyond the scripts given, requests are
served *normally*: each request gets
`200` with the request target as its body, so a later request that receives
anything but its own target has been handed someone else's answer.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import Final

READ: Final = "read"
HOLD: Final = "hold"
CLOSE: Final = "close"
Step = bytes | float | str | Callable[[bytes], bytes]
Script = Sequence[Step]


def own_answer(target: str) -> bytes:
    body = target.encode("latin-1")
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


@dataclass
class ScriptedPeer:
    scripts: list[Script]  # one per connection, in order; later connections: normal
    port: int = 0
    connections: int = 0
    heads: list[bytes] = field(default_factory=list)  # every request head received
    finished: int = 0  # connections whose script has run out
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def targets(self) -> list[str]:
        return [h.split(b" ", 2)[1].decode("latin-1") for h in self.heads]

    async def _read(self, reader: asyncio.StreamReader) -> str | None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            return None
        self.heads.append(head)
        lines = head.decode("latin-1").split("\r\n")
        fields = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
        if fields.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size = int((await reader.readline()).split(b";")[0], 16)
                await reader.readexactly(size + 2)
                if size == 0:
                    break
        elif fields.get("content-length", "").isdigit():
            await reader.readexactly(int(fields["content-length"]))
        return lines[0].split(" ")[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        script = self.scripts[self.connections] if self.connections < len(self.scripts) else ()
        self.connections += 1
        try:
            for step in script:
                if step == READ:
                    if await self._read(reader) is None:
                        return
                elif step == HOLD:
                    await reader.read()
                    return
                elif step == CLOSE:
                    return
                elif isinstance(step, bytes):
                    writer.write(step)
                    await writer.drain()
                elif callable(step):
                    writer.write(step(self.heads[-1] if self.heads else b""))
                    await writer.drain()
                else:
                    await asyncio.sleep(float(step))
            self.finished += 1
            while (target := await self._read(reader)) is not None:
                writer.write(own_answer(target))
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # the peer left, or the test is over
        finally:
            writer.close()
            with suppress(ConnectionError):
                await writer.wait_closed()


@asynccontextmanager
async def scripted_peer(*scripts: Script) -> AsyncIterator[ScriptedPeer]:
    peer = ScriptedPeer(list(scripts))
    server = await asyncio.start_server(peer._serve, "127.0.0.1", 0, limit=1 << 20)
    peer.port = server.sockets[0].getsockname()[1]
    try:
        yield peer
    finally:
        server.close()
        for task in peer._tasks:
            task.cancel()
        if peer._tasks:
            await asyncio.wait(peer._tasks, timeout=2)
        await server.wait_closed()
