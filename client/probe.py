"""An inference probe over gRPC: the probe cell of `core.probe` through `inspect`.

Health endpoints are not enough (see `core.probe`); only an inference shows a dead
Python-backend process.

    python -m client probe --url localhost:8001          # exit 0 healthy, 1 not (the reason on stderr)

`python -m export serve` runs the HTTP variant (`serving.watchdog`) on loopback every
`--watchdog` seconds and restarts tritonserver when it fails twice in a row; in Kubernetes
this command is an exec liveness probe.
"""

from __future__ import annotations

import time

import numpy as np

from client.inspection import Cell
from client.service import InspectionClient
from core.probe import check, probe_images


def probe_cell() -> Cell:
    """The probe cell as the client sends cells."""
    ct, meta, rgb = probe_images()
    return Cell(ct, meta, rgb, "probe")


def probe_grpc(
    url: str, timeout: float = 10.0, ssl: bool = False, root_certificates: str | None = None
) -> tuple[str | None, float]:
    """(None or the reason it failed, seconds) for one probe cell over gRPC, without retries."""
    start = time.perf_counter()
    try:
        with InspectionClient(
            url, timeout=timeout, heatmaps=False, ssl=ssl, root_certificates=root_certificates
        ) as client:
            r = client._inspect_batch_once([probe_cell()])[0]
    except Exception as e:  # the point of a probe: every failure is an answer
        return f"{type(e).__name__}: {e}", time.perf_counter() - start
    reason = check(np.array([r.verdict_code]), np.array(list(r.ct_probs.values())), np.array([r.rgb_score]))
    return reason, time.perf_counter() - start
