"""Access on a factory network: `python -m export serve` (what `make serve` runs) restricts the
administrative APIs to a key from the environment, serves gRPC over TLS when given a
certificate, answers only metrics on the metrics port, and never writes the key to its
output or the server log."""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from tritonclient.utils import InferenceServerException

from client.__main__ import main as client_main
from client.dataset import pair_cells
from client.service import InspectionClient
from core import interface as api
from serving.server import ADMIN_KEY_ENV, free_ports
from tests.support.tiny_models import make_ct_run, make_rgb_run

KEY = "adm1n-K3y-" + "x7Qp" * 6  # what an operator would put in TRITON_ADMIN_KEY


def _self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for localhost / 127.0.0.1 and its key, made here (cryptography)."""

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "server.pem", folder / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


def _serve(root: Path, runs, extra: list[str], env: dict) -> tuple[subprocess.Popen, list[str], list[int]]:
    ports = free_ports(4)
    cmd = [
        sys.executable,
        "-m",
        "export",
        "serve",
        "--runs",
        *map(str, runs),
        "--repository",
        str(root / "model_repository"),
        "--grpc-port",
        str(ports[0]),
        "--http-port",
        str(ports[1]),
        "--metrics-port",
        str(ports[2]),
        "--front-metrics-port",
        str(ports[3]),
        *extra,
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("try:"):
            break
    if proc.poll() is not None or not any(line.startswith("ready:") for line in lines):
        proc.kill()
        pytest.fail("serve did not start:\n" + "".join(lines))
    return proc, lines, ports


def _stop(proc: subprocess.Popen) -> str:
    proc.send_signal(2)
    rest, _ = proc.communicate(timeout=60)
    return rest


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("access_runs")
    return [make_ct_run(root / "ct", size=64), make_rgb_run(root / "rgb", size=64)]


@pytest.fixture(scope="module")
def served(runs, tmp_path_factory, small_dataset):
    """serve with TLS and an admin key from the environment."""
    root = tmp_path_factory.mktemp("access")
    cert, key = _self_signed(root)
    env = dict(os.environ, **{ADMIN_KEY_ENV: KEY})
    proc, lines, ports = _serve(root, runs, ["--tls-cert", str(cert), "--tls-key", str(key)], env)

    cells, _ = pair_cells(small_dataset[0], progress=False)
    try:
        yield {"proc": proc, "lines": lines, "ports": ports, "cert": cert, "cell": cells[0], "root": root}
    finally:
        if proc.poll() is None:
            _stop(proc)


def _tls_client(served, **kw) -> grpcclient.InferenceServerClient:
    return grpcclient.InferenceServerClient(
        f"localhost:{served['ports'][0]}", ssl=True, root_certificates=str(served["cert"]), **kw
    )


def test_inference_over_tls_with_the_servers_certificate(served):
    cell = served["cell"].load()
    with InspectionClient(f"localhost:{served['ports'][0]}", ssl=True, root_certificates=str(served["cert"])) as c:
        assert c.ready()
        assert c.inspect(cell.ct, cell.meta, cell.rgb).verdict in api.VERDICT_NAMES
    assert (
        client_main(
            [
                "inspect",
                "--url",
                f"localhost:{served['ports'][0]}",
                "--tls-ca",
                str(served["cert"]),
                "--ct",
                str(served["cell"].ct_path),
                "--meta",
                "cell,z",
                "--rgb",
                str(served["cell"].rgb_path),
                "--json",
            ]
        )
        == 0
    )


def test_a_plaintext_client_gets_nothing_from_the_tls_port(served):
    with InspectionClient(f"localhost:{served['ports'][0]}", timeout=5) as c:
        assert not c.ready()


def test_administrative_apis_need_the_key_and_inference_does_not(served):
    with _tls_client(served) as c:
        for call in (
            c.get_model_repository_index,
            lambda: c.unload_model(api.INSPECT),
            lambda: c.load_model(api.INSPECT),
        ):
            with pytest.raises(InferenceServerException, match="restricted"):
                call()
        index = c.get_model_repository_index(headers={"triton-grpc-protocol-admin-key": KEY})
        assert {m.name for m in index.models} >= {api.INSPECT, api.VERDICT_MODEL}
        c.load_model(
            api.VERDICT_MODEL, headers={"triton-grpc-protocol-admin-key": KEY}
        )  # with the key: a (re)load is allowed
        assert c.is_model_ready(api.INSPECT) and c.get_model_config(api.CT_PREPROCESS).config.name == api.CT_PREPROCESS
    http = served["ports"][1]
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(
            urllib.request.Request(f"http://127.0.0.1:{http}/v2/repository/index", data=b"{}", method="POST")
        )
    assert err.value.code == 403 and "restricted" in err.value.read().decode()


def test_the_metrics_port_answers_metrics_and_no_inference(served):
    metrics = served["ports"][2]
    body = json.dumps({"inputs": [{"name": api.CT_META, "shape": [1, 2], "datatype": "FP32", "data": [0, 2]}]}).encode()
    for path in (f"/v2/models/{api.INSPECT}/infer", "/v2/repository/index", "/v2/models/inspect/load"):
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(
                urllib.request.Request(f"http://127.0.0.1:{metrics}{path}", data=body, method="POST")
            )
        assert err.value.code == 405, path
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics").read().decode()
    assert "nv_inference_count" in text and '"outputs"' not in text


def test_the_key_appears_in_no_output_or_log(served):
    # exercise the restricted APIs with and without the key first, so there was a chance to log it
    with _tls_client(served) as c:
        c.get_model_repository_index(headers={"triton-grpc-protocol-admin-key": KEY})
        with pytest.raises(InferenceServerException):
            c.get_model_repository_index(headers={"triton-grpc-protocol-admin-key": "wrong"})
    assert any("administrative APIs" in line and ADMIN_KEY_ENV in line for line in served["lines"])
    rest = _stop(served["proc"])
    output = "".join(served["lines"]) + rest
    assert served["proc"].returncode == 0, output[-2000:]
    logs = [output] + [p.read_text(errors="replace") for p in Path(served["root"]).rglob("*.log")]
    assert all(KEY not in text for text in logs)


def test_serve_refuses_half_a_tls_configuration(runs, tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "export", "serve", "--runs", *map(str, runs), "--tls-cert", str(tmp_path / "none.pem")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "TLS needs both --tls-cert and --tls-key" in done.stderr
