"""A TCP proxy that injects network faults between a client and a real server.

Point a client at ``proxy.address`` instead of the server, then turn faults on and off while
it runs::

    proxy = await TcpProxy("127.0.0.1", 6379).start()
    proxy.set_latency(0.2)          # every chunk, both directions, waits 200 ms
    proxy.blackhole(True)           # bytes are read and dropped: requests hang, nothing replies
    proxy.reset_connections()       # every open connection is aborted with a TCP RST
    proxy.cut_replies_after(10)     # each connection gets 10 bytes of reply, then EOF
    proxy.heal()                    # no fault
    await proxy.close()

Faults apply to open connections and new ones alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct

__all__ = ["TcpProxy"]

_CHUNK = 65536


class _Link:
    """One client connection and its upstream connection."""

    def __init__(self, client: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None
        self.reply_bytes = 0
        self.closed = False

    def writers(self) -> list[asyncio.StreamWriter]:
        return [w for w in (self.client, self.upstream) if w is not None]

    def close(self) -> None:
        """Close both sides with a normal FIN."""
        self.closed = True
        for writer in self.writers():
            with contextlib.suppress(Exception):
                writer.close()

    def reset(self) -> None:
        """Abort both sides with an RST (SO_LINGER 0, then close)."""
        self.closed = True
        for writer in self.writers():
            sock = writer.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()


class TcpProxy:
    """Forwards TCP connections from ``127.0.0.1:<free port>`` to ``target_host:target_port``."""

    def __init__(self, target_host: str, target_port: int, *, listen_host: str = "127.0.0.1"):
        self.target_host = target_host
        self.target_port = target_port
        self.host = listen_host
        self.port = 0
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._latency = 0.0
        self._blackhole = False
        self._cut_after: int | None = None

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def __repr__(self) -> str:
        return (
            f"TcpProxy({self.host}:{self.port} -> {self.target_host}:{self.target_port}, "
            f"latency={self._latency}, blackhole={self._blackhole}, cut_after={self._cut_after})"
        )

    async def start(self) -> TcpProxy:
        """Listen on a free port (the OS picks it)."""
        if self._server is None:
            self._server = await asyncio.start_server(self._accept, self.host, 0)
            self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def __aenter__(self) -> TcpProxy:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- faults ---------------------------------------------------------------------------------

    def set_latency(self, seconds: float) -> None:
        """Delay every chunk, in both directions, by ``seconds`` (0 turns it off)."""
        if seconds < 0:
            raise ValueError("latency must be >= 0")
        self._latency = float(seconds)

    def blackhole(self, enabled: bool = True) -> None:
        """Accept connections and read their bytes, but never forward or reply."""
        self._blackhole = enabled

    def reset_connections(self) -> None:
        """Abort every open connection (both sides) with a TCP RST."""
        for link in list(self._links):
            link.reset()
        self._links.clear()

    def cut_replies_after(self, n_bytes: int | None) -> None:
        """Forward only the first ``n_bytes`` of the server's reply on each connection, then
        close that connection (``None`` turns it off). Bytes already sent count."""
        if n_bytes is not None and n_bytes < 0:
            raise ValueError("n_bytes must be >= 0")
        self._cut_after = n_bytes
        if n_bytes is not None:
            for link in list(self._links):
                if link.reply_bytes >= n_bytes:
                    link.close()

    def heal(self) -> None:
        """Clear every fault (connections already cut or reset stay closed)."""
        self._latency = 0.0
        self._blackhole = False
        self._cut_after = None

    async def close(self) -> None:
        """Stop listening and close every connection."""
        if self._server is not None:
            self._server.close()
        for link in list(self._links):
            link.close()
        self._links.clear()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    # -- forwarding -----------------------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        link = _Link(writer)
        self._links.add(link)
        try:
            if self._blackhole:
                # Swallow until the client gives up.
                while await reader.read(_CHUNK):
                    pass
                return
            try:
                up_reader, up_writer = await asyncio.open_connection(
                    self.target_host, self.target_port
                )
            except OSError:
                return
            link.upstream = up_writer
            if link.closed:  # reset or closed while connecting
                link.reset()
                return
            await asyncio.gather(
                self._pump(link, reader, up_writer, reply=False),
                self._pump(link, up_reader, writer, reply=True),
            )
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            if not link.closed:
                link.close()
            self._links.discard(link)
            self._tasks.discard(task)

    async def _pump(
        self,
        link: _Link,
        source: asyncio.StreamReader,
        sink: asyncio.StreamWriter,
        *,
        reply: bool,
    ) -> None:
        try:
            while not link.closed:
                data = await source.read(_CHUNK)
                if not data:
                    break
                if self._latency:
                    await asyncio.sleep(self._latency)
                if self._blackhole or link.closed:
                    continue
                if reply and self._cut_after is not None:
                    room = self._cut_after - link.reply_bytes
                    if len(data) >= room:
                        if room > 0:
                            sink.write(data[:room])
                            link.reply_bytes += room
                            await sink.drain()
                        link.close()
                        break
                sink.write(data)
                if reply:
                    link.reply_bytes += len(data)
                await sink.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            # Either side ending ends the pair: the other pump wakes up on its closed reader.
            if not link.closed:
                link.close()
