"""A simulated line PLC (an asyncua OPC UA server) for trying, testing and benchmarking the gateway.

    python -m client plc-sim --config gateway.yaml --data data/quick_test --rate 2

It serves every station's nodes at the configuration's `plc.url`, and behaves as a PLC
program would: loads a cell's fields, raises Trigger once the previous trigger was
acknowledged, and on every change of ResultCounter reads the result and copies the counter
into ResultAck. Every result is recorded with the time from raising Trigger to seeing it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from urllib.parse import urlparse

from asyncua import Server, ua
from asyncua.crypto.permission_rules import User, UserRole

from client.gateway.config import Station

TYPES = {
    "trigger": ua.VariantType.Boolean,
    "cell_id": ua.VariantType.String,
    "ct_path": ua.VariantType.String,
    "rgb_path": ua.VariantType.String,
    "ct_image": ua.VariantType.ByteString,
    "rgb_image": ua.VariantType.ByteString,
    "battery_type": ua.VariantType.Int16,
    "slice_axis": ua.VariantType.Int16,
    "result_cell_id": ua.VariantType.String,
    "verdict": ua.VariantType.Int16,
    "confidence": ua.VariantType.Float,
    "result_counter": ua.VariantType.UInt32,
    "result_ack": ua.VariantType.UInt32,
    "error": ua.VariantType.String,
}
INITIAL = {
    ua.VariantType.Boolean: False,
    ua.VariantType.String: "",
    ua.VariantType.ByteString: b"",
    ua.VariantType.Int16: 0,
    ua.VariantType.Float: 0.0,
    ua.VariantType.UInt32: 0,
}


@dataclass
class Result:
    station: str
    cell_id: str
    verdict: int
    confidence: float
    error: str
    counter: int
    seconds: float  # Trigger raised -> result seen (nan when the cell was not sent by this simulator)
    triggered: float = float("nan")  # time.monotonic() when Trigger was raised (nan as above)


@dataclass
class _Line:
    station: Station
    nodes: dict = field(default_factory=dict)  # role -> server node
    sent: dict = field(default_factory=dict)  # cell id -> monotonic time Trigger was raised
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class _Passwords:
    """asyncua user manager: only these users, with these passwords (a PLC with user authentication)."""

    def __init__(self, users: dict[str, str]):
        self.users = users

    def get_user(self, iserver, username=None, password=None, certificate=None):

        if username in self.users and password == self.users[username]:
            return User(role=UserRole.User, name=username)
        return None


class PlcSimulator:
    def __init__(
        self,
        stations: list[Station] | tuple[Station, ...],
        url: str,
        poll_s: float = 0.002,
        users: dict[str, str] | None = None,
    ):
        self.users = users  # None: anonymous sessions; else user name -> password, and no anonymous ones
        self.url = url
        self.poll_s = poll_s
        self.lines = {s.name: _Line(s) for s in stations}
        self.results: list[Result] = []
        self.server: Server | None = None
        self._tasks: list[asyncio.Task] = []
        self._changed = asyncio.Event()
        self.hold = False  # True: results are left unread (a PLC busy elsewhere); the gateway must wait

    async def start(self) -> PlcSimulator:
        # a simulator on loopback without security: asyncua's warnings about that are noise here
        logging.getLogger("asyncua.server").setLevel(logging.ERROR)
        self.server = Server(user_manager=_Passwords(self.users) if self.users else None)
        await self.server.init()
        u = urlparse(self.url)
        self.server.set_endpoint(f"opc.tcp://0.0.0.0:{u.port or 4840}{u.path or '/'}")
        self.server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
        if self.users:
            self.server.set_security_IDs(["Username"])
        objects = self.server.nodes.objects
        for line in self.lines.values():
            folder = await objects.add_object(f"ns=1;s=sim.{line.station.name}", line.station.name)
            for role, node_id in line.station.nodes.items():
                nid = ua.NodeId.from_string(node_id)
                while nid.NamespaceIndex >= len(await self.server.get_namespace_array()):
                    await self.server.register_namespace(
                        f"urn:battery-line-sim:{len(await self.server.get_namespace_array())}"
                    )
                vtype = TYPES[role]
                node = await folder.add_variable(nid, ua.QualifiedName(role, nid.NamespaceIndex), INITIAL[vtype], vtype)
                await node.set_writable()
                line.nodes[role] = node
        await self.server.start()
        self._tasks = [asyncio.create_task(self._watch(line)) for line in self.lines.values()]
        return self

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.server is not None:
            # Stop listening first. asyncua closes its clients' connections before its listening
            # socket, so a client that reconnects in between (the gateway does, at once) got a
            # new connection that Python's Server.wait_closed() then waited on for good.
            listening = getattr(getattr(self.server, "bserver", None), "_server", None)
            if listening is not None:
                listening.close()
            try:
                await asyncio.wait_for(self.server.stop(), 10)
            except TimeoutError:
                logging.getLogger("battery.plc_sim").warning("the OPC UA server did not stop within 10 s; leaving it")

    async def __aenter__(self):
        return await self.start()

    async def __aexit__(self, *exc):
        await self.stop()

    async def read(self, station: str, role: str):
        return await self.lines[station].nodes[role].read_value()

    async def write(self, station: str, role: str, value) -> None:
        node = self.lines[station].nodes[role]
        await node.write_value(ua.Variant(value, TYPES[role]))

    async def send(
        self, station: str, cell_id: str, ct: str | bytes, rgb: str | bytes, meta=(0, 2), timeout: float = 60.0
    ) -> float:
        """Load a cell and raise Trigger once the previous trigger was acknowledged (as a PLC
        must); how long it waited for that acknowledgement."""
        line = self.lines[station]
        async with line.lock:
            start = time.monotonic()
            while await line.nodes["trigger"].read_value():
                if time.monotonic() - start > timeout:
                    raise TimeoutError(
                        f"station {station}: the previous trigger was not acknowledged in {timeout:.0f} s"
                    )
                await asyncio.sleep(self.poll_s)
            waited = time.monotonic() - start
            images = ("ct_path", "rgb_path") if line.station.images == "path" else ("ct_image", "rgb_image")
            await self.write(station, "cell_id", cell_id)
            await self.write(station, images[0], ct)
            await self.write(station, images[1], rgb)
            if "battery_type" in line.nodes and line.station.meta is None:
                await self.write(station, "battery_type", int(meta[0]))
                await self.write(station, "slice_axis", int(meta[1]))
            line.sent[cell_id] = time.monotonic()
            await self.write(station, "trigger", True)
            return waited

    async def _watch(self, line: _Line) -> None:
        name, nodes = line.station.name, line.nodes
        seen = await nodes["result_counter"].read_value()
        while True:
            counter = await nodes["result_counter"].read_value()
            if counter != seen and not self.hold:
                seen = counter
                cell_id = await nodes["result_cell_id"].read_value()
                sent = line.sent.get(cell_id)
                self.results.append(
                    Result(
                        name,
                        cell_id,
                        int(await nodes["verdict"].read_value()),
                        float(await nodes["confidence"].read_value()),
                        await nodes["error"].read_value() if "error" in nodes else "",
                        int(counter),
                        time.monotonic() - sent if sent is not None else float("nan"),
                        sent if sent is not None else float("nan"),
                    )
                )
                if "result_ack" in nodes:
                    await nodes["result_ack"].write_value(ua.Variant(counter, ua.VariantType.UInt32))
                self._changed.set()
            await asyncio.sleep(self.poll_s)

    async def wait_for(self, count: int, timeout: float) -> list[Result]:
        """Wait until at least `count` results were seen (or `timeout` passed); all results."""
        deadline = time.monotonic() + timeout
        while len(self.results) < count and time.monotonic() < deadline:
            self._changed.clear()
            try:
                async with asyncio.timeout(max(0.01, deadline - time.monotonic())):
                    await self._changed.wait()
            except TimeoutError:
                break
        return list(self.results)


async def run_line(
    sim: PlcSimulator,
    cells,
    rate: float,
    seconds: float | None = None,
    count: int | None = None,
    on_result=None,
    stop: asyncio.Event | None = None,
) -> int:
    """Send cells ((cell_id, ct, rgb, meta), cycled, ids made unique) round-robin over the
    stations at `rate` cells/s for `seconds`, `count` cells or until `stop` is set (default:
    each cell once); how many were sent."""
    if seconds is None and count is None and stop is None:
        count = len(cells)
    stations = list(sim.lines)
    start, sent = time.monotonic(), 0
    sends: list[asyncio.Task] = []
    while (
        (count is None or sent < count)
        and (seconds is None or time.monotonic() - start < seconds)
        and not (stop is not None and stop.is_set())
    ):
        due = start + sent / rate
        if due > time.monotonic():
            await asyncio.sleep(due - time.monotonic())
        cell_id, ct, rgb, meta = cells[sent % len(cells)]
        unique = cell_id if sent < len(cells) else f"{cell_id}#{sent // len(cells)}"
        # a station busy with its previous trigger delays only its own next cell, as on a line
        sends.append(asyncio.create_task(sim.send(stations[sent % len(stations)], unique, ct, rgb, meta)))
        sent += 1
    await asyncio.gather(*sends)
    return sent
