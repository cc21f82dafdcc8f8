"""How the client addresses one server or several replicas (client/channel.py), and the
gateway's triton.url that feeds it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from client.channel import RETRIES, channel_args, describe, target
from client.gateway.config import ConfigError, parse_config


def test_one_address_goes_to_grpc_as_given_and_several_become_a_static_list():
    assert target("localhost:8001") == "localhost:8001"
    assert target("dns:///battery-triton-grpc.plant.svc:8001") == "dns:///battery-triton-grpc.plant.svc:8001"
    assert target("127.0.0.1:8001, 127.0.0.1:8011") == "ipv4:127.0.0.1:8001,127.0.0.1:8011"
    assert target(["localhost:8001", "127.0.0.1:8011"]) == "ipv4:127.0.0.1:8001,127.0.0.1:8011"
    assert target(["[::1]:8001", "[::1]:8011"]) == "ipv6:[::1]:8001,[::1]:8011"
    assert describe("a:1,b:2") == "2 replicas (a:1, b:2)" and describe("a:1") == "a:1"


@pytest.mark.parametrize(
    "url, message",
    [
        ("", "no server address"),
        ("localhost:8001,localhost", "'localhost' is not HOST:PORT"),
        ("localhost:8001,localhost:70000", "not HOST:PORT"),
        ("localhost:8001,dns:///x:1", "each be HOST:PORT"),
        ("localhost:8001,no-such-host.invalid:1", "cannot resolve 'no-such-host.invalid'"),
        ("127.0.0.1:8001,[::1]:8001", "do not all resolve to IPv4, nor all to IPv6"),
    ],
)
def test_a_wrong_address_list_is_named(url, message):
    with pytest.raises(ValueError, match=message):
        target(url)


def test_every_channel_balances_ejects_failing_replicas_and_retries_only_a_replicas_faults():
    args = dict(channel_args())
    config = json.loads(args["grpc.service_config"])
    (lb,) = config["loadBalancingConfig"]
    detection = lb["outlier_detection_experimental"]
    assert detection["childPolicy"] == [{"round_robin": {}}]
    assert detection["maxEjectionPercent"] <= 50  # never every replica
    assert detection["failurePercentageEjection"]["minimumHosts"] >= 2  # a lone server is never left out
    (method,) = config["methodConfig"]
    # a dead or stopping replica's answers; never a refused cell (INVALID_ARGUMENT)
    assert method["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE", "NOT_FOUND"]
    assert method["retryPolicy"]["maxAttempts"] == RETRIES + 1 <= 5  # gRPC's own ceiling
    assert args["grpc.per_rpc_retry_buffer_size"] >= 64 * 2**20  # a line-size cell is kept for its retry
    assert args["grpc.max_reconnect_backoff_ms"] <= 2000
    assert args["grpc.max_send_message_length"] == args["grpc.max_receive_message_length"] == 2**31 - 1
    assert "methodConfig" not in json.loads(dict(channel_args(retries=0))["grpc.service_config"])


def _gateway(url) -> dict:
    return {
        "plc": {"url": "opc.tcp://127.0.0.1:4840/"},
        "triton": {"url": url},
        "stations": [{"name": "s1", "prefix": "ns=2;s=L."}],
    }


@pytest.mark.parametrize(
    "url, expected",
    [
        ("triton-a:8001", "triton-a:8001"),
        (["triton-a:8001", "triton-b:8001"], "triton-a:8001,triton-b:8001"),
        ("triton-a:8001, triton-b:8001", "triton-a:8001,triton-b:8001"),
        ("dns:///battery-triton-grpc:8001", "dns:///battery-triton-grpc:8001"),
    ],
)
def test_the_gateway_takes_one_replica_a_list_or_a_dns_name(url, expected):
    assert parse_config(_gateway(url)).triton.url == expected


@pytest.mark.parametrize(
    "url, message",
    [
        (["dns:///x:8001", "a:8001"], "a dns:/// name stands alone"),
        ("a:8001,b", "'b' is not HOST:PORT"),
        ([], "no server address"),
    ],
)
def test_a_wrong_replica_list_in_the_gateway_configuration_is_named(url, message):
    with pytest.raises(ConfigError, match=f"triton.url: .*{message}"):
        parse_config(_gateway(url))


def test_the_command_line_names_a_wrong_address_list_before_connecting():
    out = subprocess.run(
        [sys.executable, "-m", "client", "probe", "--url", "localhost:8001,localhost"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and "argument --url: 'localhost' is not HOST:PORT" in out.stderr, out.stderr
