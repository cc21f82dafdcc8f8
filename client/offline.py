"""Inspection without a server: `python -m client inspect-dir --local RUNS`.

An application of the client: the PyTorch reference pipeline of `export.local` (the same
decoding, preprocessing, networks and rule as the service) behind the client's
`iter_inspect` interface, answering with the client's result types.
"""

from __future__ import annotations

from pathlib import Path

from client.inspection import CellError, Inspection
from core.facts import ServingFacts
from export.local import TorchPipeline
from export.repository import checkpoint_digest


class LocalInspector:
    """`TorchPipeline` behind the client's `iter_inspect` interface, for offline runs of
    `python -m client inspect-dir --local RUNS` (no server; one cell at a time)."""

    def __init__(self, runs, rule_path: str | Path | None = None):
        self.pipeline = TorchPipeline(runs, rule_path)
        # what MODEL_VERSIONS says of a served release, for the checkpoints run here: "local", no release
        self.versions = {"release": "local"} | {
            kind: checkpoint_digest(run)[:12] for kind, run in self.pipeline.runs.items()
        }

    def serving_info(self) -> dict[str, ServingFacts]:
        return {"ct": self.pipeline.ct_facts, "rgb": self.pipeline.rgb_facts}

    def iter_inspect(self, cells, concurrency: int = 1):
        for cell in cells:
            try:
                out = self.pipeline.run([cell.ct], [cell.meta], [cell.rgb])
            except ValueError as e:  # ImageError and bad metadata, as the server would refuse them
                yield CellError(cell.cell_id, "invalid_argument", str(e))
                continue
            result = Inspection.from_outputs(out, 0, cell.cell_id)
            result.model_versions = dict(self.versions)
            yield result

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None
