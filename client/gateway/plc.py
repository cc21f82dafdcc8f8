"""One OPC UA session to the PLC (asyncua), kept up: any failed call marks it lost, and it is
re-established with backoff while the callers wait.

Watched nodes (each station's Trigger and ResultAck) are subscribed to (`plc.watch:
subscribe`): a change wakes whoever waits on the node, who then reads it. The subscription only
wakes; the reads decide, and a node is read anyway every `recheck_ms`, so a notification the PLC
drops costs time, never a cell. A PLC that refuses subscriptions is polled every `poll_ms`.

Writes carry the node's own data type (read once per session), as PLCs reject a value of
another type (an Int64 for an Int16 verdict, say) instead of converting it.
"""

from __future__ import annotations

import asyncio
import logging

from asyncua import Client, ua

from client.gateway import metrics
from client.gateway.config import Plc

log = logging.getLogger("battery.gateway")


class PlcUnavailable(Exception):
    """The PLC did not answer (connection lost, timeout); the caller waits for `ready` and tries again."""


class PlcRejected(Exception):
    """The PLC answered with a bad status for a node (unknown node id, not writable, wrong type)."""


async def open_session(cfg: Plc) -> Client:
    """A connected asyncua client with the configuration's user and security; raises if it cannot connect."""
    if cfg.password_env:
        # asyncua logs whole requests at DEBUG, ActivateSession's password included: never below INFO here
        quiet = logging.getLogger("asyncua")
        if quiet.getEffectiveLevel() < logging.INFO:
            quiet.setLevel(logging.INFO)
    client = Client(cfg.url, timeout=cfg.timeout_s)
    try:
        if cfg.user:
            client.set_user(cfg.user)
            client.set_password(cfg.password or "")
        if cfg.security:
            await client.set_security_string(cfg.security)
        await client.connect()
    except BaseException:
        await _close(client)
        raise
    return client


class PlcLink:
    def __init__(self, cfg: Plc):
        self.cfg = cfg
        self.client: Client | None = None
        self._ready = asyncio.Event()
        self._lost = asyncio.Event()
        self._types: dict[str, ua.VariantType] = {}
        self._nodes: dict[str, object] = {}
        self._changed: dict[str, asyncio.Event] = {}  # watched node id -> set when the PLC reports a change
        self._only_true: set[str] = set()  # watched nodes whose notifications wake only when the value is true
        self.subscribed = False  # whether this session's subscription is up (else watched nodes are polled)
        self.sessions = 0  # sessions opened so far (1 + reconnections)

    def watch(self, node_id: str, only_true: bool = False) -> asyncio.Event:
        """The event set whenever `node_id` changes (`only_true`: changes to true; a trigger lowered by the
        gateway itself need not wake it). Subscribed at each connection; call before `run`."""
        if only_true:
            self._only_true.add(node_id)
        return self._changed.setdefault(node_id, asyncio.Event())

    async def wait_change(self, changed: asyncio.Event) -> None:
        """Until the watched node changes, or its next read is due (`recheck_ms`; `poll_ms` without a subscription)."""
        period = (self.cfg.recheck_ms if self.subscribed else self.cfg.poll_ms) / 1000
        try:
            async with asyncio.timeout(period):
                await changed.wait()
        except TimeoutError:
            pass

    async def run(self) -> None:
        """Keep a session up until cancelled."""
        first, longest = self.cfg.reconnect_s
        pause = first
        while True:
            try:
                client = await open_session(self.cfg)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                metrics.ERRORS.labels("plc_connect").inc()
                log.warning("PLC %s: cannot connect (%s); next attempt in %.1f s", self.cfg.url, _reason(e), pause)
                await asyncio.sleep(pause)
                pause = min(longest, pause * 2)
                continue
            self.client, self._types, self._nodes = client, {}, {}
            client.connection_lost_callback = self._connection_lost  # asyncua's watchdog: a loss between our calls
            self.sessions += 1
            pause = first
            self.subscribed = await self._subscribe(client)
            for changed in self._changed.values():  # whatever changed while disconnected: read it now
                changed.set()
            self._lost.clear()
            self._ready.set()
            metrics.PLC_CONNECTED.set(1)
            log.info("PLC %s: connected%s", self.cfg.url, "" if self.sessions == 1 else " again")
            try:
                await self._lost.wait()
            finally:
                self._ready.clear()
                self.subscribed = False
                metrics.PLC_CONNECTED.set(0)
                self.client = None
                await _close(client)

    async def _subscribe(self, client: Client) -> bool:
        if self.cfg.watch != "subscribe" or not self._changed:
            return False
        by_node = {ua.NodeId.from_string(n): (changed, n in self._only_true) for n, changed in self._changed.items()}

        class Changes:
            def datachange_notification(self, node, val, data):
                changed, only_true = by_node.get(node.nodeid, (None, False))
                if changed is not None and (val or not only_true):
                    changed.set()

            def status_change_notification(self, status):
                pass  # a subscription that times out shows as a failed read or write, which reconnects

        try:
            async with asyncio.timeout(self.cfg.timeout_s):
                sub = await client.create_subscription(self.cfg.poll_ms, Changes())
                codes = await sub.subscribe_data_change(
                    [client.get_node(n) for n in by_node], sampling_interval=self.cfg.poll_ms
                )
            bad = [f"{n.to_string()}: {c.name}" for n, c in zip(by_node, codes) if isinstance(c, ua.StatusCode)]
            if bad:
                raise PlcRejected(", ".join(bad))
        except Exception as e:
            metrics.ERRORS.labels("plc_subscribe").inc()
            log.warning(
                "PLC %s: no subscription (%s); reading watched nodes every %g ms instead",
                self.cfg.url,
                _reason(e),
                self.cfg.poll_ms,
            )
            return False
        return True

    @property
    def connected(self) -> bool:
        return self._ready.is_set()

    async def wait_ready(self) -> None:
        await self._ready.wait()

    def _lose(self, e: BaseException) -> PlcUnavailable:
        if self._ready.is_set():
            metrics.ERRORS.labels("plc_lost").inc()
            log.warning("PLC %s: connection lost (%s); reconnecting", self.cfg.url, _reason(e))
        self._ready.clear()
        self._lost.set()
        return PlcUnavailable(_reason(e))

    async def _connection_lost(self, e: Exception) -> None:
        # asyncua probes the server once a second; with a subscription the gateway itself may not
        # read anything for a while, and a lost session must not wait for its next read
        if self.connected:
            self._lose(e)

    def _node(self, node_id: str):
        node = self._nodes.get(node_id)
        if node is None:
            node = self._nodes[node_id] = self.client.get_node(node_id)
        return node

    async def _call(self, work):
        if not self._ready.is_set():
            raise PlcUnavailable("not connected")
        try:
            # asyncio.timeout, not wait_for: Python 3.11's wait_for can swallow a cancellation that
            # arrives as the call completes, and this runs every poll period
            async with asyncio.timeout(self.cfg.timeout_s):
                return await work()
        except (PlcRejected, asyncio.CancelledError):
            raise
        except ua.UaStatusCodeError as e:
            if _is_connection_status(e):
                raise self._lose(e) from None
            raise PlcRejected(str(e)) from None
        except Exception as e:  # a closed socket, a timeout, a session the server dropped
            raise self._lose(e) from None

    async def read(self, node_ids: list[str]) -> list:
        """Values of the nodes, in order, in one Read request."""

        async def work():
            metrics.PLC_REQUESTS.labels("read").inc()
            nodes = [self._node(n) for n in node_ids]
            results = await self.client.uaclient.read_attributes([n.nodeid for n in nodes], ua.AttributeIds.Value)
            out = []
            for node_id, dv in zip(node_ids, results):
                if not dv.StatusCode.is_good():
                    raise PlcRejected(f"reading {node_id}: {dv.StatusCode.name}")
                out.append(dv.Value.Value if dv.Value is not None else None)
            return out

        return await self._call(work)

    async def write(self, values: list[tuple[str, object]]) -> None:
        """Write (node id, value) pairs in one Write request, each as its node's data type."""

        async def work():
            metrics.PLC_REQUESTS.labels("write").inc()
            nodes = [self._node(n) for n, _ in values]
            for (node_id, _), node in zip(values, nodes):
                if node_id not in self._types:
                    self._types[node_id] = await node.read_data_type_as_variant_type()
            data = [ua.DataValue(ua.Variant(_as(v, self._types[n]), self._types[n])) for n, v in values]
            codes = await self.client.uaclient.write_attributes([n.nodeid for n in nodes], data, ua.AttributeIds.Value)
            bad = [f"{n}: {c.name}" for (n, _), c in zip(values, codes) if not c.is_good()]
            if bad:
                raise PlcRejected("writing " + ", ".join(bad))

        return await self._call(work)


_INTS = {
    ua.VariantType.SByte,
    ua.VariantType.Byte,
    ua.VariantType.Int16,
    ua.VariantType.UInt16,
    ua.VariantType.Int32,
    ua.VariantType.UInt32,
    ua.VariantType.Int64,
    ua.VariantType.UInt64,
}


def _as(value, vtype: ua.VariantType):
    if vtype in _INTS:
        return int(value)
    if vtype in (ua.VariantType.Float, ua.VariantType.Double):
        return float(value)
    if vtype == ua.VariantType.Boolean:
        return bool(value)
    if vtype == ua.VariantType.String:
        return str(value)
    return value


def _is_connection_status(e: ua.UaStatusCodeError) -> bool:
    name = f"{type(e).__name__} {e}"
    return any(
        s in name
        for s in (
            "BadSessionIdInvalid",
            "BadSessionClosed",
            "BadConnectionClosed",
            "BadSecureChannel",
            "BadCommunicationError",
            "BadServerNotConnected",
            "BadTimeout",
            "BadShutdown",
        )
    )


def _reason(e: BaseException) -> str:
    return str(e) or type(e).__name__


async def _close(client: Client) -> None:
    try:
        async with asyncio.timeout(2.0):
            await client.disconnect()
    except Exception:
        pass  # the connection is gone already; nothing to close cleanly
