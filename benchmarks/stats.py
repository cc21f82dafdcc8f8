"""Where the server spends a cell's time: Triton's own per-model statistics over a run.

Two snapshots of the statistics extension (before and after a load) give, per model, the
requests and executions (so the dynamic batches it formed), the time a request waited in
its queue, and the compute time split into input (tensors into the backend: for the Python
backend, the copy into its shared memory), inference, and output (the copy back out),
amortised per cell over the batches that ran.
"""

from __future__ import annotations

import tritonclient.grpc as grpcclient

STEPS = ("compute_input", "compute_infer", "compute_output")


def snapshot(url: str) -> dict[str, dict]:
    """Cumulative statistics of every loaded model, by model name."""

    with grpcclient.InferenceServerClient(url) as client:
        stats = client.get_inference_statistics()
        ensembles = {m.name for m in stats.model_stats if client.get_model_config(m.name).config.platform == "ensemble"}
    out = {}
    for m in stats.model_stats:
        if m.name in ensembles:  # an ensemble's "compute" is its whole pipeline: its steps are reported instead
            continue
        s = m.inference_stats
        entry = {
            "inferences": m.inference_count,
            "executions": m.execution_count,
            "requests": s.success.count,
            "queue_ns": s.queue.ns,
            "failures": s.fail.count,
        }
        for step in STEPS:  # per execution, so a batch of 8 counts once
            entry[f"{step}_ns"] = sum(getattr(b, step).ns for b in m.batch_stats)
        out[m.name] = entry
    return out


def per_cell(before: dict[str, dict], after: dict[str, dict]) -> list[dict]:
    """Per model, what happened between two snapshots: counts, mean batch, and milliseconds per cell."""
    rows = []
    for name, a in sorted(after.items()):
        b = before.get(name, dict.fromkeys(a, 0))
        d = {k: a[k] - b.get(k, 0) for k in a}
        if d["requests"] <= 0:
            continue
        cells = max(d["inferences"], 1)
        row = {
            "model": name,
            "requests": d["requests"],
            "failures": d["failures"],
            "executions": d["executions"],
            "mean_batch": d["inferences"] / d["executions"] if d["executions"] else 0.0,
            "queue_ms": d["queue_ns"] / d["requests"] / 1e6,
        }
        for step in STEPS:
            row[f"{step}_ms"] = d[f"{step}_ns"] / cells / 1e6
        row["copy_share"] = (row["compute_input_ms"] + row["compute_output_ms"]) / max(
            row["compute_input_ms"] + row["compute_infer_ms"] + row["compute_output_ms"], 1e-12
        )
        rows.append(row)
    return rows
