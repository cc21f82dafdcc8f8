"""Explanations for flagged cells, off the hot path: Grad-CAM, the error map, a VLM finding
and GroundingDINO boxes, in one JSON + HTML report per cell and an index per run."""

from client.explain.case import Case, View
from client.explain.pipeline import ExplanationPipeline, Part

__all__ = ["Case", "View", "ExplanationPipeline", "Part"]
