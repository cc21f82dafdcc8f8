"""Open-vocabulary boxes (GroundingDINO) for the CT slice and the exterior photo.

- `TransformersGrounding`: GroundingDINO through transformers' Auto classes from a local
  weights folder (e.g. IDEA-Research/grounding-dino-tiny downloaded beforehand).
- `GroundingDinoPy`: the original implementation (package groundingdino-py), from a config
  file and a .pth checkpoint, as an optional second backend.

Prompts are phrases joined with " . "; each box's phrase is mapped back to a class.
"""

from __future__ import annotations

from pathlib import Path
from threading import Lock

import numpy as np
from PIL import Image

from client.explain.vlm import BackendUnavailable

# phrase -> class; CT porosity maps to the battery type's porosity class
CT_PHRASES = {"porosity": "porosity", "void": "porosity", "pore": "porosity", "resin overflow": "module_resin_overflow"}
RGB_PHRASES = {"scratch": "scratch", "dent": "dent", "stain": "stain", "contamination": "contamination"}
PORE_CLASS = ("cell_porosity", "module_porosity")


def phrase_class(label: str, phrases: dict[str, str], battery_type: int) -> tuple[str, str]:
    """(phrase, class) for a detector's label: the prompt phrase it names (exact, else contained)."""
    text = " ".join(label.lower().split())
    match = text if text in phrases else next((p for p in sorted(phrases, key=len, reverse=True) if p in text), None)
    if match is None:
        return text, "unknown"
    cls = phrases[match]
    return match, PORE_CLASS[int(battery_type)] if cls == "porosity" else cls


def caption(phrases) -> str:
    return " . ".join(phrases) + " ."


class TransformersGrounding:
    name = "transformers"

    def __init__(self, weights: str | Path, device: str | None = None):
        import torch  # noqa: PLC0415 - with the optional detector only
        from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor  # noqa: PLC0415 - optional heavy dependency

        path = Path(weights)
        if not (path / "config.json").is_file():
            raise BackendUnavailable(
                f"{path} is not a model folder (no config.json): put GroundingDINO weights there, "
                "e.g. 'huggingface-cli download IDEA-Research/grounding-dino-tiny --local-dir DIR'"
            )
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.processor = AutoProcessor.from_pretrained(path, local_files_only=True)
        self.model = (
            AutoModelForZeroShotObjectDetection.from_pretrained(path, local_files_only=True).to(self.device).eval()
        )
        self.path = path
        self._lock = Lock()

    @property
    def description(self) -> str:
        return f"{type(self.model).__name__} from {self.path} on {self.device}"

    def detect(
        self, image: Image.Image, phrases, box_threshold: float, text_threshold: float
    ) -> list[tuple[str, float, list[float]]]:
        """[(label, score, [x0, y0, x1, y1] in image pixels)]"""
        import torch  # noqa: PLC0415 - with the optional detector only

        inputs = self.processor(images=image, text=caption(phrases), return_tensors="pt").to(self.device)
        with self._lock, torch.inference_mode():
            outputs = self.model(**inputs)
        r = self.processor.post_process_grounded_object_detection(
            outputs,
            inputs["input_ids"],
            threshold=box_threshold,
            text_threshold=text_threshold,
            target_sizes=[image.size[::-1]],
        )[0]
        labels = r["text_labels"] if "text_labels" in r else r["labels"]
        return [
            (str(label), float(s), [float(v) for v in b])
            for label, s, b in zip(labels, r["scores"].tolist(), r["boxes"].tolist())
        ]


class GroundingDinoPy:
    name = "groundingdino"

    def __init__(self, config: str | Path, weights: str | Path, device: str | None = None):
        try:
            from groundingdino.util.inference import load_model  # noqa: PLC0415 - optional heavy dependency
        except ImportError:
            raise BackendUnavailable(
                "the groundingdino backend needs the groundingdino-py package (pip install groundingdino-py)"
            ) from None
        import torch  # noqa: PLC0415 - with the optional detector only

        for p in (config, weights):
            if not Path(p).is_file():
                raise BackendUnavailable(
                    f"{p} does not exist: give the GroundingDINO config (.py) and checkpoint (.pth)"
                )
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = load_model(str(config), str(weights), device=self.device)
        self.path = Path(weights)
        self._lock = Lock()

    @property
    def description(self) -> str:
        return f"groundingdino-py {self.path.name} on {self.device}"

    def detect(
        self, image: Image.Image, phrases, box_threshold: float, text_threshold: float
    ) -> list[tuple[str, float, list[float]]]:
        import groundingdino.datasets.transforms as T  # noqa: PLC0415 - optional heavy dependency
        from groundingdino.util.inference import predict  # noqa: PLC0415 - optional heavy dependency

        transform = T.Compose(
            [
                T.RandomResize([800], max_size=1333),
                T.ToTensor(),
                T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
            ]
        )
        tensor, _ = transform(image.convert("RGB"), None)
        with self._lock:
            boxes, logits, labels = predict(
                self.model, tensor, caption(phrases), box_threshold, text_threshold, device=self.device
            )
        w, h = image.size
        out = []
        for (cx, cy, bw, bh), score, label in zip(np.asarray(boxes, float), np.asarray(logits, float), labels):
            out.append(
                (str(label), float(score), [(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h])
            )
        return out


GROUNDING_BACKENDS = ("transformers", "groundingdino")


def make_grounding(kind: str, weights: str | Path | None, config: str | Path | None = None, device: str | None = None):
    if weights is None:
        raise BackendUnavailable(f"the {kind} grounding backend needs local weights (--grounding-weights)")
    if kind == "transformers":
        return TransformersGrounding(weights, device)
    if kind == "groundingdino":
        if config is None:
            raise BackendUnavailable("the groundingdino backend needs its config file (--grounding-config)")
        return GroundingDinoPy(config, weights, device)
    raise ValueError(f"unknown grounding backend {kind!r}; choose one of {', '.join(GROUNDING_BACKENDS)}")
