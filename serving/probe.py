"""The server's liveness probe: the probe cell (core.probe) through `inspect` over gRPC.

    python3 -m serving.probe [--url 127.0.0.1:8001] [--timeout 10] [--tls-ca PEM]

Exit 0 when the answer is sound; 1 with the reason on stderr. Health endpoints stay green when
a Python-backend process dies (see core.probe); only an inference shows it, so this is the
Kubernetes liveness probe (an exec probe in docker/k8s/triton.yaml). It needs only what the
server image has (tritonclient[grpc], numpy, Pillow); `client.probe` is the same probe for
the client side, `serving.watchdog` the HTTP one beside `make serve`.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import tritonclient.grpc as grpcclient

from core import interface as api
from core.probe import check, probe_images


def probe(url: str, timeout: float = 10.0, tls_ca: str | None = None) -> tuple[str | None, float]:
    """(None or the reason it failed, seconds) for one probe cell, without retries."""
    ct, meta, rgb = probe_images()
    start = time.perf_counter()
    try:
        with grpcclient.InferenceServerClient(url, ssl=tls_ca is not None, root_certificates=tls_ca) as client:
            inputs = []
            for name, array, dtype in (
                (api.CT_IMAGE, np.array([[ct]], object), "BYTES"),
                (api.CT_META, np.array([meta], np.float32), "FP32"),
                (api.RGB_IMAGE, np.array([[rgb]], object), "BYTES"),
            ):
                t = grpcclient.InferInput(name, list(array.shape), dtype)
                t.set_data_from_numpy(array)
                inputs.append(t)
            outputs = [grpcclient.InferRequestedOutput(n) for n in (api.VERDICT, api.CT_PROBS, api.RGB_SCORE)]
            result = client.infer(api.INSPECT, inputs, outputs=outputs, client_timeout=timeout)
            reason = check(result.as_numpy(api.VERDICT), result.as_numpy(api.CT_PROBS), result.as_numpy(api.RGB_SCORE))
    except Exception as e:  # the point of a probe: every failure is an answer
        reason = f"{type(e).__name__}: {e}"
    return reason, time.perf_counter() - start


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m serving.probe", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--url", default="127.0.0.1:8001", help="the server's gRPC address (default 127.0.0.1:8001)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds for the answer (default 10)")
    p.add_argument("--tls-ca", metavar="PEM", help="connect over TLS, trusting this certificate")
    args = p.parse_args(argv)
    reason, seconds = probe(args.url, args.timeout, args.tls_ca)
    if reason:
        print(f"probe failed after {seconds:.2f} s: {reason}", file=sys.stderr)
        return 1
    print(f"probe ok in {seconds * 1000:.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
