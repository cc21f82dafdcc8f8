"""The explainers: each looks at one flagged cell and writes its part of the report.

An explainer has a `name` and `explain(case, folder) -> (data, files)`: JSON-ready data
and the images it wrote into the cell's folder ({role: file name}). Raising is how it
says it could not: the pipeline then marks its part unavailable with the reason.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from client.explain import overlays
from client.explain.case import Box, Case
from client.explain.grounding import CT_PHRASES, RGB_PHRASES, phrase_class
from client.explain.prompts import ct_prompt, location_box, parse_finding, rgb_prompt

CAM_THRESHOLD = 0.5
# our name -> pytorch-grad-cam class
CAM_METHODS = {
    "gradcam": "GradCAM",
    "gradcam++": "GradCAMPlusPlus",
    "xgradcam": "XGradCAM",
    "hirescam": "HiResCAM",
    "gradcamelementwise": "GradCAMElementWise",
    "layercam": "LayerCAM",
    "eigencam": "EigenCAM",
    "eigengradcam": "EigenGradCAM",
    "kpcacam": "KPCA_CAM",
    "scorecam": "ScoreCAM",
    "ablationcam": "AblationCAM",
    "shapleycam": "ShapleyCAM",
}


def _save(image: Image.Image, folder: Path, name: str) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    image.save(folder / name)
    return name


def ct_cam_overlay(case: Case, cam=None, threshold: float = CAM_THRESHOLD):
    cam = case.inspection.ct_cam if cam is None else cam
    if cam is None:
        raise ValueError("the answer carries no CT_CAM: inspect with heatmaps")
    return overlays.cam_overlay(case.ct_view.image, cam, threshold)


def rgb_error_overlay(case: Case, threshold: float | None = None):
    emap = case.inspection.rgb_error_map
    if emap is None:
        raise ValueError("the answer carries no RGB_ERROR_MAP: inspect with heatmaps")
    t = case.inspection.rgb_threshold if threshold is None else threshold
    border = float((case.rgb_facts.score or {}).get("border", 0.0))
    return overlays.error_overlay(case.rgb_view.image, emap, t, border=border)


class CTHeatmap:
    """Grad-CAM over the CT slice: the service's CT_CAM, or pytorch-grad-cam (`TorchCAM`)."""

    name = "ct_heatmap"

    def __init__(self, torch_cam=None, threshold: float = CAM_THRESHOLD):
        self.torch_cam, self.threshold = torch_cam, threshold

    @property
    def description(self) -> str:
        return f"pytorch-grad-cam {self.torch_cam.method}" if self.torch_cam else "service CT_CAM (in-graph Grad-CAM)"

    def explain(self, case: Case, folder: Path):
        cam = None
        if self.torch_cam is not None:
            cam = self.torch_cam(case.ct_tensor, case.meta)
        image, boxes = ct_cam_overlay(case, cam, self.threshold)
        image, labelled = _with_labels(case, "ct", image)
        files = {
            "image": _save(overlays.image_png(case.ct_view.image), folder, "ct.png"),
            "overlay": _save(image, folder, "ct_cam.png"),
        }
        data = {
            "source": self.description,
            "threshold": self.threshold,
            "class": case.inspection.ct_class,
            "view_size": case.ct_view.size,
            "regions": [b.to_dict(case.ct_view) for b in boxes],
            "labelled_defects": labelled,
        }
        if self.torch_cam is not None and case.inspection.ct_cam is not None:
            served = case.inspection.ct_cam
            if served.std() > 0 and cam.std() > 0:
                data["pearson_with_service_cam"] = round(float(np.corrcoef(served.ravel(), cam.ravel())[0, 1]), 4)
        return data, files


class RGBErrorMap:
    """The autoencoder's error map over the photo, its threshold contour and the regions over it."""

    name = "rgb_error_map"
    description = "autoencoder reconstruction error"

    def __init__(self, threshold: float | None = None):
        self.threshold = threshold  # None: the service's score threshold

    def explain(self, case: Case, folder: Path):
        image, boxes = rgb_error_overlay(case, self.threshold)
        image, labelled = _with_labels(case, "rgb", image)
        files = {
            "image": _save(overlays.image_png(case.rgb_view.image), folder, "rgb.png"),
            "overlay": _save(image, folder, "rgb_error.png"),
        }
        t = case.inspection.rgb_threshold if self.threshold is None else self.threshold
        data = {
            "threshold": t,
            "score": case.inspection.rgb_score,
            "anomalous": case.inspection.rgb_anomalous,
            "peak_error": float(case.inspection.rgb_error_map.max()),
            "view_size": case.rgb_view.size,
            "regions": [b.to_dict(case.rgb_view) for b in boxes],
            "labelled_defects": labelled,
        }
        return data, files


def _with_labels(case: Case, side: str, image):
    """The overlay with the cell's labelled defect polygons drawn on it (white, named), and their names."""
    view = case.ct_view if side == "ct" else case.rgb_view
    polygons = [(d["name"], view.from_source(zip(d["points"][0::2], d["points"][1::2]))) for d in case.labelled(side)]
    if not polygons:
        return image, []
    return overlays.draw_labelled(image, polygons, view.size), [name for name, _ in polygons]


def flagged_sides(case: Case) -> list[str]:
    """The modalities the verdict flags: internal -> ct, external -> rgb, combined and not_inspectable -> both."""
    code = case.inspection.verdict_code
    return [s for s, bit in (("ct", 1), ("rgb", 2)) if code & bit] or ["ct", "rgb"]


class VLMFinding:
    """A VLM's finding for each flagged modality, grounded with the statistical result."""

    name = "vlm"

    def __init__(self, backend, lang: str = "en", cam_threshold: float = CAM_THRESHOLD):
        self.backend, self.lang, self.cam_threshold = backend, lang, cam_threshold

    @property
    def description(self) -> str:
        return self.backend.description

    def explain(self, case: Case, folder: Path):
        data, errors = {"backend": self.backend.description, "lang": self.lang}, []
        for side in flagged_sides(case):
            if side == "ct":
                overlay, boxes = ct_cam_overlay(case, threshold=self.cam_threshold)
                view, prompt = case.ct_view, ct_prompt(case.inspection, case.meta, boxes, case.ct_view.size, self.lang)
            else:
                overlay, boxes = rgb_error_overlay(case)
                view, prompt = (
                    case.rgb_view,
                    rgb_prompt(case.inspection, case.meta, boxes, case.rgb_view.size, self.lang),
                )
            try:
                answer = self.backend.ask([overlays.image_png(view.image), overlay], prompt)
            except Exception as e:
                errors.append(f"{side}: {e}")
                data[side] = {"prompt": prompt, "error": str(e)}
                continue
            data[side] = {"prompt": prompt, **parse_finding(answer)}
            box = location_box((data[side].get("finding") or {}).get("location"), view.size)
            if box is not None:  # where the VLM says the defect is, also in the station image's pixels
                data[side]["region"] = {"box": box, "source_box": view.to_source(box), "view_size": view.size}
        if errors and len(errors) == len(flagged_sides(case)):
            raise RuntimeError("; ".join(errors))
        return data, {}


class Grounding:
    """GroundingDINO boxes on both views, each mapped to a class by its phrase."""

    name = "grounding"

    def __init__(
        self, backend, box_threshold: float = 0.35, text_threshold: float = 0.25, ct_phrases=None, rgb_phrases=None
    ):
        self.backend, self.box_threshold, self.text_threshold = backend, box_threshold, text_threshold
        self.phrases = {"ct": dict(ct_phrases or CT_PHRASES), "rgb": dict(rgb_phrases or RGB_PHRASES)}

    @property
    def description(self) -> str:
        return self.backend.description

    def explain(self, case: Case, folder: Path):
        data, files = (
            {
                "backend": self.backend.description,
                "box_threshold": self.box_threshold,
                "text_threshold": self.text_threshold,
            },
            {},
        )
        for side, view in (("ct", case.ct_view), ("rgb", case.rgb_view)):
            phrases = self.phrases[side]
            shown = overlays.image_png(view.image)
            found = self.backend.detect(shown, list(phrases), self.box_threshold, self.text_threshold)
            scale = view.size / shown.width  # boxes back to view pixels
            boxes, detections = [], []
            for label, score, (x0, y0, x1, y1) in sorted(found, key=lambda d: -d[1]):
                phrase, cls = phrase_class(label, phrases, int(case.meta[0]))
                box = Box(*(int(round(v * scale)) for v in (x0, y0, x1, y1)), peak=score, label=f"{phrase} {score:.2f}")
                boxes.append(box)
                detections.append(
                    {
                        "phrase": phrase,
                        "class": cls,
                        "score": round(score, 4),
                        "box": [box.x0, box.y0, box.x1, box.y1],
                        "source_box": view.to_source((box.x0, box.y0, box.x1, box.y1)),
                    }
                )
            data[side] = {"prompt": " . ".join(phrases) + " .", "view_size": view.size, "detections": detections}
            files[f"{side}_boxes"] = _save(overlays.boxes_overlay(view.image, boxes), folder, f"{side}_boxes.png")
        return data, files


class Unavailable:
    """Stands in for an explainer that could not be set up: every cell gets the reason."""

    def __init__(self, name: str, reason: str):
        self.name, self.reason, self.description = name, reason, f"unavailable: {reason}"

    def explain(self, case: Case, folder: Path):
        raise RuntimeError(self.reason)
