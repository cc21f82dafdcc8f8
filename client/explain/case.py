"""What an explainer gets: one flagged cell with its images and the service's answer.

The heatmaps the service returns are at the models' input geometry (the battery cropped
and resized to a square), so overlays are drawn on the same view of the image: the
decoded image put through the service's own preprocessing (`View`). `View.to_source`
maps a box back to pixels of the image the station sent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from client.inspection import Inspection
from core.facts import ServingFacts
from core.preprocess import Crop, encoded_ct_input, encoded_rgb_input


@dataclass(frozen=True)
class Box:
    """A region in view pixels (x1, y1 exclusive), with its area and the map's peak inside it."""

    x0: int
    y0: int
    x1: int
    y1: int
    area: int = 0
    peak: float = 0.0
    label: str = ""

    def to_dict(self, view: View | None = None) -> dict:
        d = {"box": [self.x0, self.y0, self.x1, self.y1], "area": self.area, "peak": round(self.peak, 6)}
        if self.label:
            d["label"] = self.label
        if view is not None:
            d["source_box"] = view.to_source((self.x0, self.y0, self.x1, self.y1))
        return d


@dataclass(frozen=True)
class View:
    """An image as the model saw it: (S, S) grey or (S, S, 3) colour, 0..1, and its crop."""

    image: np.ndarray
    crop: Crop

    @property
    def size(self) -> int:
        return int(self.image.shape[0])

    def to_source(self, box) -> list[int]:
        """(x0, y0, x1, y1) in view pixels -> the same region in the station's image (pixels)."""
        sx, sy = self.crop.width / self.size, self.crop.height / self.size
        x0, y0, x1, y1 = box
        return [
            int(round(self.crop.x0 + x0 * sx)),
            int(round(self.crop.y0 + y0 * sy)),
            int(round(self.crop.x0 + x1 * sx)),
            int(round(self.crop.y0 + y1 * sy)),
        ]

    def from_source(self, points) -> list[tuple[float, float]]:
        """Points (x, y) in pixels of the station's image -> the same points in view pixels."""
        sx, sy = self.size / max(self.crop.width, 1), self.size / max(self.crop.height, 1)
        return [((x - self.crop.x0) * sx, (y - self.crop.y0) * sy) for x, y in points]


@dataclass
class Case:
    """A flagged cell: the encoded images, its metadata, the service's answer and the
    serving facts of both models (input size and normalisation, from the repository)."""

    inspection: Inspection
    ct: bytes
    meta: tuple[float, float]
    rgb: bytes
    ct_facts: ServingFacts
    rgb_facts: ServingFacts
    extra: dict = field(default_factory=dict)  # paths, labels: copied into the report as they are

    def labelled(self, side: str) -> list[dict]:
        """The labelled defect polygons of one image ("ct" or "rgb"), in its source pixels: where a
        labelled data set (inspect-dir) gives them, as {"name", "points": [x1, y1, x2, y2, ...]}."""
        return list((self.extra.get("labels") or {}).get(side) or [])

    @property
    def cell_id(self) -> str:
        return self.inspection.cell_id

    @cached_property
    def _ct_input(self):
        norm = self.ct_facts.normalization
        return encoded_ct_input(self.ct, self.ct_facts.input_size, norm.mean, norm.std)

    @property
    def ct_tensor(self) -> np.ndarray:
        """The CT model input (1, S, S), normalised, as the service computes it."""
        return self._ct_input[0]

    @cached_property
    def ct_view(self) -> View:
        norm = self.ct_facts.normalization
        x, crop = self._ct_input
        return View(np.clip(x[0] * norm.std + norm.mean, 0.0, 1.0), crop)

    @cached_property
    def rgb_view(self) -> View:
        x, crop = encoded_rgb_input(self.rgb, self.rgb_facts.input_size)
        return View(np.transpose(x, (1, 2, 0)), crop)
