"""An inference probe: a real cell through `inspect`, because health endpoints are not enough.

When a Python-backend process of Triton dies (killed, out of memory), tritonserver 2.51 keeps
reporting itself live and every model ready while each request that reaches that model fails
with "Stub process ... is not healthy". Only an inference shows it. The probe cell is made
here (a CT slice with a round cell, a photo of a box on a bench), so the probe needs no files.

    python -m client probe --url localhost:8001          # exit 0 healthy, 1 not (the reason on stderr)

`python -m export serve` runs the HTTP variant on loopback every `--watchdog` seconds and
restarts tritonserver when it fails twice in a row; in Kubernetes the command is an exec
liveness probe.
"""
from __future__ import annotations

import io
import time
from functools import lru_cache

import numpy as np
from PIL import Image

from client.inspection import Cell
from ensemble import interface as api


@lru_cache(maxsize=1)
def probe_cell() -> Cell:
    """A small synthetic cell that passes every input check: a round cell in a CT slice, a
    coloured box on a grey bench."""
    yy, xx = np.mgrid[:128, :128]
    ct = np.where((yy - 64) ** 2 + (xx - 64) ** 2 < 40**2, 150 + 40 * np.sin(xx / 6), 8).astype(np.uint8)
    photo = np.full((108, 192, 3), 120, np.uint8)
    photo[:30] = 90
    photo[40:90, 70:130] = (40, 150, 90)

    def png(a):
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")
        return buf.getvalue()

    return Cell(png(ct), (0.0, 2.0), png(photo), "probe")


def check(verdict: np.ndarray, probs: np.ndarray, score: np.ndarray) -> str | None:
    """Why an answer to the probe cell is not a sound answer, or None."""
    code = int(np.asarray(verdict).reshape(-1)[0])
    p = np.asarray(probs, np.float64).reshape(-1)
    s = float(np.asarray(score).reshape(-1)[0])
    if code not in range(len(api.VERDICT_NAMES)):
        return f"verdict code {code} is not one of 0..{len(api.VERDICT_NAMES) - 1}"
    if not (np.isfinite(p).all() and abs(p.sum() - 1) < 1e-3):
        return f"CT probabilities are not a distribution: {p.tolist()}"
    if not np.isfinite(s):
        return f"RGB score is not finite: {s}"
    return None


def probe_grpc(url: str, timeout: float = 10.0, ssl: bool = False, root_certificates: str | None = None) -> tuple[str | None, float]:
    """(None or the reason it failed, seconds) for one probe cell over gRPC, without retries."""
    from client.service import InspectionClient

    start = time.perf_counter()
    try:
        with InspectionClient(url, timeout=timeout, heatmaps=False, ssl=ssl, root_certificates=root_certificates) as client:
            r = client._inspect_batch_once([probe_cell()])[0]
    except Exception as e:  # the point of a probe: every failure is an answer
        return f"{type(e).__name__}: {e}", time.perf_counter() - start
    reason = check(np.array([r.verdict_code]), np.array(list(r.ct_probs.values())), np.array([r.rgb_score]))
    return reason, time.perf_counter() - start


def probe_http(url: str, timeout: float = 10.0) -> tuple[str | None, float]:
    """The same over Triton's HTTP endpoint (plain, so a server-side watchdog can use it beside gRPC TLS)."""
    import tritonclient.http as httpclient

    cell = probe_cell()
    start = time.perf_counter()
    try:
        with httpclient.InferenceServerClient(url, connection_timeout=timeout, network_timeout=timeout) as client:
            inputs = []
            for name, array, dtype in ((api.CT_IMAGE, np.array([[cell.ct]], object), "BYTES"),
                                       (api.CT_META, np.array([cell.meta], np.float32), "FP32"),
                                       (api.RGB_IMAGE, np.array([[cell.rgb]], object), "BYTES")):
                t = httpclient.InferInput(name, list(array.shape), dtype)
                t.set_data_from_numpy(array, binary_data=True)
                inputs.append(t)
            outputs = [httpclient.InferRequestedOutput(n, binary_data=True) for n in (api.VERDICT, api.CT_PROBS, api.RGB_SCORE)]
            result = client.infer(api.INSPECT, inputs, outputs=outputs)
            reason = check(result.as_numpy(api.VERDICT), result.as_numpy(api.CT_PROBS), result.as_numpy(api.RGB_SCORE))
    except Exception as e:
        reason = f"{type(e).__name__}: {e}"
    return reason, time.perf_counter() - start
