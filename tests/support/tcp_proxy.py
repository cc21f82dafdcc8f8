"""A TCP relay whose link can be cut and restored: a network drop between two real programs
(the gateway and the simulated PLC), with neither of them stopped."""

from __future__ import annotations

import asyncio


class TcpProxy:
    def __init__(self, target_port: int, host: str = "127.0.0.1"):
        self.host, self.target_port = host, target_port
        self.server: asyncio.base_events.Server | None = None
        self.port = 0
        self._links: set[asyncio.StreamWriter] = set()
        self.up = True
        self.connections = 0

    async def start(self, port: int = 0) -> TcpProxy:
        self.server = await asyncio.start_server(self._serve, self.host, port)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader, writer):
        if not self.up:
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(self.host, self.target_port)
        except OSError:
            writer.close()
            return
        self.connections += 1
        self._links |= {writer, up_writer}

        async def pipe(src, dst):
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                dst.close()
                self._links.discard(dst)

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def cut(self) -> None:
        """Drop every open connection and refuse new ones until `restore`."""
        self.up = False
        for w in list(self._links):
            w.transport.abort()
        self._links.clear()

    def restore(self) -> None:
        self.up = True

    async def stop(self) -> None:
        self.cut()
        self.server.close()
        await self.server.wait_closed()
