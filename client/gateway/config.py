"""The gateway's configuration: one YAML file, checked whole before anything connects.

Every station names its PLC nodes by OPC UA node id. `prefix` saves writing them out: a node
that is not given is `prefix + <its default name>` (e.g. `ns=2;s=Line1.Station1.` +
`Trigger`). Secrets never sit in the file: the PLC password comes from the environment
variable named by `plc.password_env`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path

import yaml

from client.channel import replicas

# role -> default node name under the station's prefix
INPUT_NODES = {
    "trigger": "Trigger",
    "cell_id": "CellId",
    "ct_path": "CtPath",
    "rgb_path": "RgbPath",
    "battery_type": "BatteryType",
    "slice_axis": "SliceAxis",
}
BYTES_NODES = {"ct_image": "CtImage", "rgb_image": "RgbImage"}  # images as ByteString nodes instead of paths
OUTPUT_NODES = {
    "result_cell_id": "ResultCellId",
    "verdict": "Verdict",
    "confidence": "Confidence",
    "result_counter": "ResultCounter",
    "error": "Error",
}
ACK_NODE = {"result_ack": "ResultAck"}  # PLC -> gateway: the last ResultCounter it has read


class ConfigError(ValueError):
    """A configuration mistake, with where it is."""


@dataclass(frozen=True)
class Station:
    name: str
    nodes: dict[str, str]  # role -> node id
    images: str = "path"  # path: CtPath/RgbPath name files on a shared folder; bytes: CtImage/RgbImage hold them
    image_root: Path | None = None  # relative paths from the PLC are taken under this folder
    meta: tuple[float, float] | None = None  # fixed [battery_type, slice_axis]; None: read BatteryType/SliceAxis
    takt_ms: float = 2000.0
    handshake: bool = True  # wait for ResultAck == ResultCounter before writing the next result

    @property
    def input_roles(self) -> list[str]:
        roles = ["cell_id"] + (["ct_path", "rgb_path"] if self.images == "path" else ["ct_image", "rgb_image"])
        return roles + ([] if self.meta else ["battery_type", "slice_axis"])


@dataclass(frozen=True)
class Plc:
    url: str
    timeout_s: float = 4.0
    watch: str = "subscribe"  # subscribe: the PLC reports Trigger/ResultAck changes; poll: read them every poll_ms
    poll_ms: float = 10.0  # poll period; with subscribe, the sampling and publishing interval asked of the PLC
    recheck_ms: float = (
        1000.0  # with subscribe, watched nodes are also read this often (a dropped notification is not a lost cell)
    )
    reconnect_s: tuple[float, float] = (0.5, 5.0)  # first and longest pause between reconnection attempts
    security: str | None = None  # asyncua security string, e.g. "Basic256Sha256,SignAndEncrypt,cert.der,key.pem"
    user: str | None = None
    password_env: str | None = None  # the environment variable holding the password

    @property
    def password(self) -> str | None:
        if not self.password_env:
            return None
        value = os.environ.get(self.password_env)
        if value is None:
            raise ConfigError(f"plc.password_env: ${self.password_env} is not set")
        return value


@dataclass(frozen=True)
class Triton:
    url: str = "localhost:8001"  # or several replicas, separated by commas, or dns:///NAME:PORT
    timeout_s: float = 10.0
    tls_ca: Path | None = None
    concurrency: int = 8  # cells in flight to Triton
    retry_s: tuple[float, float] = (0.2, 5.0)  # backoff while Triton is unavailable (it is retried until it answers)


@dataclass(frozen=True)
class Explain:
    out: Path | None = None  # None: flagged cells are not explained
    options: str = ""  # explanation options as on the command line, e.g. "--vlm gemini"
    backlog: int = 256


@dataclass(frozen=True)
class Archive:
    out: Path | None = None  # None: no cell is kept (client/archive.py)
    sample: float = 0.05  # share of normal cells kept beside every flagged one
    max_gb: float = 50.0  # retention: the oldest unreviewed cells go first
    max_days: float = 365.0


@dataclass(frozen=True)
class Shadow:
    fraction: float = 0.0  # share of answered cells also sent to the staged release; 0: no shadow traffic
    model: str = "inspect_staged"  # the ensemble that runs the staged release
    # where: the line's Triton (None), or a server of its own (a replica kept for it) so that the
    # shadow takes no capacity from the line
    url: str | None = None
    log: Path | None = None  # JSONL of each shadowed cell's two answers (None: beside the outbox)
    pending: int = 16  # shadow cells waiting at most; more are skipped (counted), never queued behind the line
    timeout_s: float = 30.0


@dataclass(frozen=True)
class GatewayConfig:
    plc: Plc
    stations: tuple[Station, ...]
    triton: Triton = Triton()
    outbox: Path = Path("gateway_outbox.sqlite")
    outbox_keep_days: float = (
        7.0  # written cells older than this are forgotten (their answers stay in the PLC's records)
    )
    metrics_port: int | None = 9108
    error_code: int = -1  # written to Verdict for a cell the service refused (the reason goes to Error)
    explain: Explain = Explain()
    archive: Archive = Archive()
    shadow: Shadow = Shadow()


def _take(section: dict, cls, where: str, **converted):
    known = {f.name for f in fields(cls)}
    unknown = set(section) - known
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
    return cls(**(section | converted))


def _pair(value, where: str) -> tuple[float, float]:
    if not (isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value)):
        raise ConfigError(f"{where}: expected two numbers, got {value!r}")
    return float(value[0]), float(value[1])


def _replicas(url) -> str:
    """triton.url: one HOST:PORT, several (a list, or separated by commas), or dns:///NAME:PORT."""
    try:
        parts = replicas(url if isinstance(url, (str, list)) else str(url))
    except ValueError as e:
        raise ConfigError(f"triton.url: {e}") from None
    return ",".join(parts)


def _station(raw: dict, i: int, base: Path) -> Station:
    where = f"stations[{i}]"
    if not isinstance(raw, dict) or not raw.get("name"):
        raise ConfigError(f"{where}: a station needs a name")
    where = f"station {raw['name']!r}"
    raw = dict(raw)
    prefix = raw.pop("prefix", "")
    given = raw.pop("nodes", {}) or {}
    images = raw.get("images", "path")
    if images not in ("path", "bytes"):
        raise ConfigError(f"{where}: images must be 'path' or 'bytes', got {images!r}")
    handshake = raw.get("handshake", True)
    roles = INPUT_NODES | OUTPUT_NODES | (BYTES_NODES if images == "bytes" else {}) | (ACK_NODE if handshake else {})
    if images == "bytes":
        roles = {k: v for k, v in roles.items() if k not in ("ct_path", "rgb_path")}
    unknown = set(given) - set(roles)
    if unknown:
        raise ConfigError(f"{where}: unknown node role(s) {', '.join(sorted(unknown))}; roles: {', '.join(roles)}")
    nodes = {}
    for role, name in roles.items():
        if role == "error" and role in given and not given[role]:
            continue  # turned off (error: null): the reason of a refused cell is then only in the outbox and the log
        node = given.get(role) or (prefix + name if prefix else None)
        if node is None:
            if role == "error":
                continue  # optional
            raise ConfigError(f"{where}: no node id for {role} (give nodes.{role} or a prefix)")
        nodes[role] = str(node)
    meta = raw.pop("meta", None)
    if meta is not None:
        meta = _pair(meta, f"{where}: meta")
        if meta[0] not in (0, 1) or meta[1] not in (0, 1, 2):
            raise ConfigError(
                f"{where}: meta is [battery_type (0 cell, 1 module), slice_axis (0 x, 1 y, 2 z)], got {list(meta)}"
            )
    root = raw.pop("image_root", None)
    station = _take(raw, Station, where, nodes=nodes, meta=meta, image_root=(base / root) if root else None)
    if station.takt_ms <= 0:
        raise ConfigError(f"{where}: takt_ms must be positive")
    return station


def parse_config(raw: dict, base: Path = Path(".")) -> GatewayConfig:
    """A GatewayConfig from the YAML's mapping; relative paths are taken from `base` (the file's folder)."""
    if not isinstance(raw, dict):
        raise ConfigError("the configuration must be a mapping with plc and stations")
    raw = dict(raw)
    if "plc" not in raw or not isinstance(raw["plc"], dict) or not raw["plc"].get("url"):
        raise ConfigError("plc.url is required (e.g. opc.tcp://plc.line1:4840)")
    plc = dict(raw.pop("plc"))
    if "reconnect_s" in plc:
        plc["reconnect_s"] = _pair(plc["reconnect_s"], "plc.reconnect_s")
    plc = _take(plc, Plc, "plc")
    if plc.watch not in ("subscribe", "poll"):
        raise ConfigError(f"plc.watch must be 'subscribe' or 'poll', got {plc.watch!r}")
    if not (plc.poll_ms > 0 and plc.recheck_ms > 0 and plc.timeout_s > 0):
        raise ConfigError("plc: poll_ms, recheck_ms and timeout_s must be positive")
    stations = raw.pop("stations", None)
    if not stations or not isinstance(stations, list):
        raise ConfigError("stations: at least one station is required")
    parsed = tuple(_station(s, i, base) for i, s in enumerate(stations))
    names = [s.name for s in parsed]
    if len(set(names)) != len(names):
        raise ConfigError(f"stations: names must be unique, got {names}")
    triton = dict(raw.pop("triton", {}) or {})
    if "url" in triton:
        triton["url"] = _replicas(triton["url"])
    if "retry_s" in triton:
        triton["retry_s"] = _pair(triton["retry_s"], "triton.retry_s")
    if triton.get("tls_ca"):
        triton["tls_ca"] = base / triton["tls_ca"]
    triton = _take(triton, Triton, "triton")
    if triton.concurrency < 1:
        raise ConfigError("triton.concurrency must be at least 1")
    explain = dict(raw.pop("explain", {}) or {})
    if explain.get("out"):
        explain["out"] = base / explain["out"]
    explain = _take(explain, Explain, "explain")
    archive = dict(raw.pop("archive", {}) or {})
    if archive.get("out"):
        archive["out"] = base / archive["out"]
    archive = _take(archive, Archive, "archive")
    if not (0.0 <= archive.sample <= 1.0 and archive.max_gb > 0 and archive.max_days > 0):
        raise ConfigError("archive: sample must be within 0..1, max_gb and max_days positive")
    shadow = dict(raw.pop("shadow", {}) or {})
    if shadow.get("url"):
        try:
            shadow["url"] = ",".join(replicas(shadow["url"]))
        except ValueError as e:
            raise ConfigError(f"shadow.url: {e}") from None
    if shadow.get("log"):
        shadow["log"] = base / shadow["log"]
    shadow = _take(shadow, Shadow, "shadow")
    if not (0.0 <= shadow.fraction <= 1.0 and shadow.pending >= 1 and shadow.timeout_s > 0):
        raise ConfigError("shadow: fraction must be within 0..1, pending at least 1, timeout_s positive")
    if "outbox" in raw:
        raw["outbox"] = base / raw["outbox"]
    return _take(
        raw,
        GatewayConfig,
        "gateway",
        plc=plc,
        stations=parsed,
        triton=triton,
        explain=explain,
        archive=archive,
        shadow=shadow,
    )


def load_config(path: str | Path) -> GatewayConfig:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    try:
        return parse_config(raw, path.parent)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    except TypeError as e:  # a wrong type that the dataclass caught
        raise ConfigError(f"{path}: {e}") from None
