"""The probe cell: a known cell whose answer shows that inference works end to end.

When a Python-backend process of Triton dies (killed, out of memory), tritonserver 2.51 keeps
reporting itself live and every model ready while each request that reaches that model fails
with "Stub process ... is not healthy". Only an inference shows it. The probe cell is made
here (a CT slice with a round cell, a photo of a box on a bench), so a probe needs no files:
`serving.watchdog` sends it over HTTP from beside the server, `client.probe` over gRPC.
"""

from __future__ import annotations

import io
from functools import lru_cache

import numpy as np
from PIL import Image

from core import interface as api


@lru_cache(maxsize=1)
def probe_images() -> tuple[bytes, tuple[float, float], bytes]:
    """(CT PNG, CT_META, photo PNG) of a small synthetic cell that passes every input check: a
    round cell in a CT slice, a coloured box on a grey bench."""
    yy, xx = np.mgrid[:128, :128]
    ct = np.where((yy - 64) ** 2 + (xx - 64) ** 2 < 40**2, 150 + 40 * np.sin(xx / 6), 8).astype(np.uint8)
    photo = np.full((108, 192, 3), 120, np.uint8)
    photo[:30] = 90
    photo[40:90, 70:130] = (40, 150, 90)

    def png(a):
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")
        return buf.getvalue()

    return png(ct), (0.0, 2.0), png(photo)


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
