"""What the Triton Python models do, as plain functions tested without a server.

The `model.py` files in the repository only move tensors between Triton and these.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from core import interface as api
from core.decode import ImageError, Limits
from core.facts import ServingFacts
from core.labels import BATTERY_TYPES, SLICE_AXES
from core.preprocess import encoded_ct_input, encoded_rgb_input
from ensemble.rule import VerdictRule, apply_ood, decide, rgb_anomalous, rgb_confidence, worst_ood


class RequestError(ValueError):
    """A request that cannot be answered; the message is sent back to the client, `reason`
    (one of core.interface.REFUSAL_REASONS) is what the refusal metrics count."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def _meta_shape(meta: np.ndarray) -> np.ndarray:
    meta = np.asarray(meta)
    if meta.dtype != np.float32:
        raise RequestError(f"CT_META must be FP32, got {meta.dtype}", "metadata")
    if meta.ndim != 2 or meta.shape[1] != 2:
        raise RequestError(
            f"CT_META must hold 2 values per cell [battery_type, slice_axis], got shape {list(meta.shape[1:])}",
            "metadata",
        )
    return meta


def _meta_row(row: np.ndarray) -> None:
    """One cell's [battery_type, slice_axis]: finite whole numbers in range."""
    if not np.isfinite(row).all():
        raise RequestError(f"CT_META contains NaN or infinity: {row.tolist()}", "metadata")
    for value, (name, values) in zip(row, (("battery_type", BATTERY_TYPES), ("slice_axis", SLICE_AXES))):
        if value != round(float(value)) or not 0 <= value < len(values):
            choices = ", ".join(f"{k} {n}" for k, n in enumerate(values))
            raise RequestError(f"CT_META {name} must be one of {choices}; got {float(value)}", "metadata")


def _named(i: int, e: Exception) -> RequestError:
    """`e` as the error of cell i of its request: "cell i: ..." (every refusal names its cell, so a
    client can answer the others: `InspectionClient.inspect_cells`)."""
    reason = e.reason if isinstance(e, (ImageError, RequestError)) else "not_an_image"
    return RequestError(f"cell {i}: {e}", reason)


def check_meta(meta: np.ndarray) -> np.ndarray:
    """CT_META of one request (n, 2) -> the same, validated: finite, whole numbers, in range; the
    first bad cell is named ("cell 3: ...")."""
    meta = _meta_shape(meta)
    for i, row in enumerate(meta):
        try:
            _meta_row(row)
        except RequestError as e:
            raise _named(i, e) from None
    return meta


def _image_bytes(item) -> bytes:
    if isinstance(item, np.ndarray):
        item = item.item() if item.size == 1 else item.tobytes()
    if isinstance(item, str):
        raise RequestError("image must be sent as raw bytes (BYTES tensor), got a text string", "not_bytes")
    return bytes(item)


def ct_tensor(data: bytes, facts: ServingFacts, limits: Limits = Limits()) -> np.ndarray:
    """One encoded CT slice -> (1, S, S) float32 model input, as training prepared it."""
    norm = facts.normalization
    return encoded_ct_input(data, facts.input_size, norm.mean, norm.std, limits, frame=facts.frame)[0]


def rgb_tensor(data: bytes, facts: ServingFacts, limits: Limits = Limits()) -> np.ndarray:
    """One encoded photo -> (3, S, S) float32 in 0..1, as training prepared it."""
    return encoded_rgb_input(data, facts.input_size, limits, frame=facts.frame)[0]


def _items(images: np.ndarray) -> np.ndarray:
    return np.asarray(images, object).reshape(len(images), -1)[:, 0]


def _one(i: int, make, *args):
    try:
        return make(*args)
    except (ImageError, ValueError) as e:
        raise _named(i, e) from None


def _encoded_batch(images: np.ndarray, one_cell, facts: ServingFacts, limits: Limits) -> np.ndarray:
    """The (n, 1) encoded images of one request through `one_cell`; the first bad cell is named."""
    out = [
        _one(i, lambda item: one_cell(_image_bytes(item), facts, limits), item) for i, item in enumerate(_items(images))
    ]
    return np.stack(out).astype(np.float32, copy=False)


def ct_tensors(images: np.ndarray, facts: ServingFacts, limits: Limits = Limits()) -> np.ndarray:
    """CT_IMAGE of one request (n, 1) of encoded bytes -> (n, 1, S, S) float32 model input."""
    return _encoded_batch(images, ct_tensor, facts, limits)


def rgb_tensors(images: np.ndarray, facts: ServingFacts, limits: Limits = Limits()) -> np.ndarray:
    """RGB_IMAGE of one request (n, 1) of encoded bytes -> (n, 3, S, S) float32 in 0..1."""
    return _encoded_batch(images, rgb_tensor, facts, limits)


def cell_tensors(
    meta: np.ndarray, ct_images: np.ndarray, rgb_images: np.ndarray, ct: ServingFacts, rgb: ServingFacts, limits: Limits
) -> tuple[np.ndarray, np.ndarray]:
    """A whole request of `inspect` -> (CT tensors, RGB tensors), checked cell by cell in order (its
    metadata, its CT slice, its photo), so the cell named in a refusal is the lowest bad one."""
    meta = _meta_shape(meta)
    cts, rgbs = [], []
    for i, (row, ct_item, rgb_item) in enumerate(zip(meta, _items(ct_images), _items(rgb_images), strict=True)):
        _one(i, _meta_row, row)
        cts.append(_one(i, lambda item: ct_tensor(_image_bytes(item), ct, limits), ct_item))
        rgbs.append(_one(i, lambda item: rgb_tensor(_image_bytes(item), rgb, limits), rgb_item))
    return np.stack(cts).astype(np.float32, copy=False), np.stack(rgbs).astype(np.float32, copy=False)


def available_cores() -> int:
    """The cores this process may run on: its CPU affinity, capped by a cgroup CPU quota
    (a container started with --cpus N), at least 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    for path, parse in (
        ("/sys/fs/cgroup/cpu.max", lambda t: t.split()),  # cgroup v2: "quota period" or "max period"
        (
            "/sys/fs/cgroup/cpu/cpu.cfs_quota_us",
            lambda t: [t.strip(), Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text().strip()],
        ),
    ):
        try:
            quota, period = parse(Path(path).read_text())
            if quota not in ("max", "-1") and int(period) > 0:
                cores = min(cores, max(1, -(-int(quota) // int(period))))
            break
        except (OSError, ValueError):
            continue
    return max(1, cores)


def preprocess_instances_for(cores: int) -> int:
    """Preprocessing processes for `cores` cores: one each (decoding is single-threaded), at most 4."""
    return min(4, cores)


class OrtRunner:
    """One ONNX Runtime session; runs the requests of a dynamic batch as one batch.

    If the joint run fails (a request whose tensors the graph rejects), each request is
    run alone so that only the bad one gets an error.
    """

    def __init__(self, path: str | Path, threads: int = 0):
        import onnxruntime as ort  # noqa: PLC0415 - absent where Triton's native backends run the networks

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or available_cores()
        opts.inter_op_num_threads = 1
        # Threads that wait for work sleep instead of spinning: the cores are shared with the
        # preprocessing processes and the other network, and a spinning pool takes their time
        # (full preset, line-size cells, 2 threads per network: 3.8 cells/s spinning, 4.6 not).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # No memory pattern: a pattern is planned and kept per input shape, i.e. per batch size
        # here, and the arena fragments across them (quick autoencoder, batches 1-16: 145 MiB
        # with patterns, 102 without, at the same speed).
        opts.enable_mem_pattern = False
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]

    def run_many(self, requests: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray] | Exception]:
        """Per request: its outputs by name, or the exception that request caused."""
        if not requests:
            return []
        sizes = [len(r[self.inputs[0]]) for r in requests]
        try:
            joined = (
                requests[0]
                if len(requests) == 1
                else {n: np.concatenate([r[n] for r in requests]) for n in self.inputs}
            )
            outputs = self.session.run(self.outputs, joined)
        except Exception as e:
            if len(requests) == 1:  # nothing to isolate: its error is this one
                return [RequestError(f"inference failed: {e}", "inference")]
            return [self._run_one(r) for r in requests]
        bounds = np.cumsum([0, *sizes])
        return [{n: o[a:b] for n, o in zip(self.outputs, outputs)} for a, b in zip(bounds[:-1], bounds[1:])]

    def _run_one(self, request: dict[str, np.ndarray]) -> dict[str, np.ndarray] | Exception:
        try:
            return dict(zip(self.outputs, self.session.run(self.outputs, {n: request[n] for n in self.inputs})))
        except Exception as e:
            return RequestError(f"inference failed: {e}", "inference")


def verdict_outputs(
    rule: VerdictRule,
    probs: list[np.ndarray | None],
    scores: list[np.ndarray],
    ct_oods: list[np.ndarray | None] | None = None,
    rgb_oods: list[np.ndarray | None] | None = None,
) -> list[dict[str, np.ndarray]]:
    """The `verdict` model's answer for each request of a dynamic batch, decided in one call.

    A request without CT_PROBS (from `inspect_rgb`) gets the RGB half only: verdict 0 or 2,
    the RGB confidence, the threshold; the batch may mix both kinds. Where a request carries
    out-of-distribution scores (CT_OOD, RGB_OOD), one >= 1 makes its verdict 4.
    """
    scores = [np.asarray(s, np.float32).reshape(-1) for s in scores]
    bounds = np.cumsum([0, *(len(s) for s in scores)])
    score = np.concatenate(scores)
    n = len(score)
    ct_oods = ct_oods or [None] * len(scores)
    rgb_oods = rgb_oods or [None] * len(scores)

    def joined(parts):  # per-request scores -> (N,), 0 for a request without them
        return np.concatenate(
            [
                np.zeros(len(s), np.float32) if p is None else np.asarray(p, np.float32).reshape(-1)
                for p, s in zip(parts, scores)
            ]
        )

    if all(p is not None for p in probs):
        d = decide(rule, np.concatenate(probs), score)
        verdict, confidence = d.verdict, d.confidence
    else:
        verdict = np.where(rgb_anomalous(rule, score), 2, 0).astype(np.int32)
        confidence = rgb_confidence(score, rule.rgb_threshold)
        for p, s, a, b in zip(probs, scores, bounds[:-1], bounds[1:]):
            if p is not None:
                part = decide(rule, p, s)
                verdict[a:b], confidence[a:b] = part.verdict, part.confidence
    verdict, confidence, _ = apply_ood(verdict, confidence, worst_ood(n, joined(ct_oods), joined(rgb_oods)))
    return [
        {
            api.VERDICT: verdict[a:b, None],
            api.CONFIDENCE: confidence[a:b, None],
            api.RGB_THRESHOLD: np.full((b - a, 1), rule.rgb_threshold, np.float32),
        }
        for a, b in zip(bounds[:-1], bounds[1:])
    ]


SCORE_BUCKETS = (0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 3.0, 5.0)  # x the RGB threshold: fine around it


def score_buckets(rule: VerdictRule) -> list[float]:
    """Histogram bucket bounds for the RGB anomaly score: multiples of the rule's threshold."""
    return [round(b * rule.rgb_threshold, 9) for b in SCORE_BUCKETS]


def verdict_tally(
    rule: VerdictRule,
    probs: list[np.ndarray | None],
    metas: list[np.ndarray | None],
    outputs: list[dict[str, np.ndarray]],
    scores: list[np.ndarray],
    ct_oods: list | None = None,
    rgb_oods: list | None = None,
) -> dict[str, list]:
    """What the `verdict` model's metrics count for one batch of requests.

    verdicts: (verdict name, battery type) per whole cell, i.e. per request with CT_PROBS and
    CT_META (`inspect`; a request of `inspect_rgb` decides only its photo and is not a cell's
    verdict); ct_classes: the top CT class per cell that has CT_PROBS; scores: every RGB
    anomaly score; refused: "ct" / "rgb" per input out of distribution.
    """
    verdicts, classes, values, refused = [], [], [], []
    for i, (p, m, out, s) in enumerate(zip(probs, metas, outputs, scores)):
        if p is not None and m is not None:
            codes = np.asarray(out[api.VERDICT]).reshape(-1)
            types = [BATTERY_TYPES[int(v)] for v in np.asarray(m).reshape(-1, 2)[:, 0]]
            verdicts += [(api.VERDICT_NAMES[int(c)], t) for c, t in zip(codes, types)]
        if p is not None:
            classes += [rule.class_names[int(i)] for i in np.asarray(p).argmax(axis=1)]
        values += [float(v) for v in np.asarray(s).reshape(-1)]
        for source, oods in (("ct", ct_oods), ("rgb", rgb_oods)):
            if oods and oods[i] is not None:
                refused += [source] * int((~(np.asarray(oods[i], np.float32).reshape(-1) < 1.0)).sum())
    return {"verdicts": verdicts, "ct_classes": classes, "scores": values, "refused": refused}
