"""The whole inspection in-process with PyTorch: the reference the served pipeline must equal.

Same decoding, same preprocessing, the checkpoints' own networks (eager PyTorch, with the
exported graphs' heads: temperature-scaled probabilities, in-graph Grad-CAM, the
checkpoint's anomaly score) and the same verdict rule. Returns the tensors of the public
interface, so its answers compare one to one with Triton's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from core import interface as api
from core.facts import ServingFacts
from ensemble.rule import decide, load_rule
from export.graphs import inference_graph
from export.repository import classify_runs
from serving.runtime import check_meta, ct_tensor, rgb_tensor
from training.checkpoint import load_checkpoint


class TorchPipeline:
    def __init__(self, runs, rule_path: str | Path | None = None):
        found = classify_runs(runs)
        self.runs = found  # kind -> run folder
        ct_model, self.ct_info = load_checkpoint(found["ct_classifier"])
        rgb_model, self.rgb_info = load_checkpoint(found["rgb_autoencoder"])
        self.ct_graph = inference_graph(ct_model, self.ct_info)
        self.rgb_graph = inference_graph(rgb_model, self.rgb_info)
        self.ct_facts, self.rgb_facts = ServingFacts.from_dict(self.ct_info), ServingFacts.from_dict(self.rgb_info)
        self.rule = load_rule(self.rgb_facts, self.ct_facts.class_names, rule_path)

    @torch.no_grad()
    def run(self, ct_images: list[bytes], meta, rgb_images: list[bytes]) -> dict[str, np.ndarray]:
        """The `inspect` outputs for a batch of encoded cells."""
        meta = check_meta(np.asarray(meta, np.float32).reshape(-1, 2))
        ct = torch.from_numpy(np.stack([ct_tensor(b, self.ct_facts) for b in ct_images]))
        rgb = torch.from_numpy(np.stack([rgb_tensor(b, self.rgb_facts) for b in rgb_images]))
        probs, cam, ct_ood = (t.numpy() for t in self.ct_graph(ct, torch.from_numpy(meta)))
        score, emap, rgb_ood = (t.numpy() for t in self.rgb_graph(rgb))
        d = decide(self.rule, probs, score[:, 0], ct_ood, rgb_ood)
        return {
            api.VERDICT: d.verdict[:, None],
            api.CONFIDENCE: d.confidence[:, None],
            api.CT_PROBS: probs,
            api.RGB_SCORE: score,
            api.RGB_THRESHOLD: np.full((len(score), 1), self.rule.rgb_threshold, np.float32),
            api.CT_CAM: cam,
            api.RGB_ERROR_MAP: emap,
            api.CT_OOD: ct_ood,
            api.RGB_OOD: rgb_ood,
        }
