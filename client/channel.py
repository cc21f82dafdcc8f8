"""How a client reaches the service: one address, several replicas, or a DNS name that resolves to several.

    InspectionClient("localhost:8001")                      # one server
    InspectionClient("10.0.0.5:8001,10.0.0.6:8001")         # two replicas (or a list of addresses)
    InspectionClient("dns:///battery-triton-grpc:8001")      # every address of a name (Kubernetes' headless Service)

The balancing and the failover are gRPC's own, set once here as the channel's service config:

- **round_robin**: one connection to every address, each request on the next ready one, so a
  replica gets its share from its first connected second (a single HTTP/2 connection, gRPC's
  default `pick_first`, would keep a client on one replica for as long as it lives).
- **outlier detection** around it: a replica that failed at least half of its requests within
  an interval (a stopping tritonserver answers UNAVAILABLE "Server is stopping", then
  NOT_FOUND while its models unload) is left out for 5 s, longer if it does it again; at most
  half of the replicas are left out at once, and a lone server never is.
- **retries**: a request that fails with UNAVAILABLE (the replica died, refused the
  connection, is stopping) or NOT_FOUND (a stopping replica has unloaded its models) is sent
  again by gRPC, up to 4 more times, on the next ready replica: an inference is a pure
  function of its inputs, so a retry cannot do harm. A refused cell is never retried. The
  whole request is kept for that (`grpc.per_rpc_retry_buffer_size`: a line-size cell is a
  few MB).
- **reconnection**: a replica that went away is tried again every 0.25-2 s, so a restarted one
  is back in the rotation within about 2 s of being up.

Addresses of a list are resolved once, when the client starts (a replica that moves needs a
new client); a `dns:///` name is resolved again whenever a connection drops, and a server
started with `--grpc-max-connection-age` makes its clients reconnect (and so resolve the name
again, finding new replicas) at that age.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Sequence

MAX_MESSAGE = 2**31 - 1  # tritonclient's own limit on both directions
# kept per request for a retry; a larger request is not retried by gRPC (the caller's own retry takes over)
RETRY_BUFFER = 256 * 2**20
RETRIES = 4  # attempts after the first (gRPC allows at most 5 attempts in all)
SERVICE = "inference.GRPCInferenceService"


def service_config(retries: int = RETRIES) -> dict:
    """The gRPC service config of every client channel (see the module's docstring)."""
    config: dict = {
        "loadBalancingConfig": [
            {
                "outlier_detection_experimental": {
                    "interval": "0.5s",
                    "baseEjectionTime": "5s",
                    "maxEjectionTime": "60s",
                    "maxEjectionPercent": 50,
                    "failurePercentageEjection": {
                        "threshold": 50,
                        "enforcementPercentage": 100,
                        "minimumHosts": 2,
                        "requestVolume": 4,
                    },
                    "childPolicy": [{"round_robin": {}}],
                }
            }
        ]
    }
    if retries:
        config["methodConfig"] = [
            {
                "name": [{"service": SERVICE}],
                "retryPolicy": {
                    "maxAttempts": retries + 1,
                    "initialBackoff": "0.05s",
                    "maxBackoff": "0.5s",
                    "backoffMultiplier": 2,
                    # UNAVAILABLE: a replica died, refused, or is stopping; NOT_FOUND: a stopping
                    # tritonserver unloading its models ("has no available versions"). A truly
                    # unknown model fails after the retries, a refused cell (INVALID_ARGUMENT) at once
                    "retryableStatusCodes": ["UNAVAILABLE", "NOT_FOUND"],
                },
            }
        ]
    return config


def channel_args(retries: int = RETRIES) -> list[tuple[str, object]]:
    """tritonclient's `channel_args`: its own defaults (message size, keepalive) plus balancing,
    failover and reconnection."""
    return [
        ("grpc.max_send_message_length", MAX_MESSAGE),
        ("grpc.max_receive_message_length", MAX_MESSAGE),
        ("grpc.keepalive_time_ms", 2**31 - 1),
        ("grpc.keepalive_timeout_ms", 20000),
        ("grpc.keepalive_permit_without_calls", False),
        ("grpc.http2.max_pings_without_data", 2),
        ("grpc.service_config", json.dumps(service_config(retries))),
        ("grpc.enable_retries", 1 if retries else 0),
        ("grpc.per_rpc_retry_buffer_size", RETRY_BUFFER),
        ("grpc.initial_reconnect_backoff_ms", 250),
        ("grpc.min_reconnect_backoff_ms", 250),
        ("grpc.max_reconnect_backoff_ms", 2000),
    ]


def addresses(url: str | Sequence[str]) -> list[str]:
    """The addresses of a URL: a list, or a string of comma-separated ones; spaces ignored."""
    parts = url.split(",") if isinstance(url, str) else list(url)
    out = [p.strip() for p in parts if p and p.strip()]
    if not out:
        raise ValueError(
            "no server address given (expected HOST:PORT, several separated by commas, or dns:///NAME:PORT)"
        )
    return out


def host_port(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{address!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def replicas(url: str | Sequence[str]) -> list[str]:
    """The addresses of `url`, checked as written (nothing resolved): one HOST:PORT or
    dns:///NAME:PORT, or several HOST:PORT."""
    parts = addresses(url)
    if len(parts) > 1:
        for part in parts:
            if "://" in part or part.startswith(("ipv4:", "ipv6:", "unix:")):
                raise ValueError(
                    f"{part!r}: several addresses must each be HOST:PORT (a dns:/// name stands alone, not in a list)"
                )
            host_port(part)
    return parts


def target(url: str | Sequence[str]) -> str:
    """The gRPC channel target for one address, a dns:/// name, or several addresses.

    One address (or a dns:/// name) is given to gRPC as it is: its resolver finds every address
    of the name. Several are resolved now into gRPC's static list (`ipv4:a:p,b:p`), IPv4 where
    every name has one, else IPv6."""
    parts = replicas(url)
    if len(parts) == 1:
        return parts[0]
    v4, v6 = [], []
    for part in parts:
        host, port = host_port(part)
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as e:
            raise ValueError(f"cannot resolve {host!r} of {part!r}: {e.strerror}") from None
        v4 += [f"{i[4][0]}:{port}" for i in infos if i[0] == socket.AF_INET][:1]
        v6 += [f"[{i[4][0]}]:{port}" for i in infos if i[0] == socket.AF_INET6][:1]
    if len(v4) == len(parts):
        return "ipv4:" + ",".join(v4)
    if len(v6) == len(parts):
        return "ipv6:" + ",".join(v6)
    raise ValueError(f"the addresses {', '.join(parts)} do not all resolve to IPv4, nor all to IPv6")


def describe(url: str | Sequence[str]) -> str:
    """For messages: 'localhost:8001' or '2 replicas (a:1, b:2)'."""
    parts = addresses(url)
    return parts[0] if len(parts) == 1 else f"{len(parts)} replicas ({', '.join(parts)})"
