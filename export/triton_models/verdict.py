"""CT_PROBS + RGB_SCORE -> VERDICT, CONFIDENCE, RGB_THRESHOLD by the rule of `ensemble/`.

The resolved rule (thresholds included) is the config parameter `rule`. CT_PROBS is
optional: without it (the `inspect_rgb` ensemble) only the RGB half is decided.
"""
import numpy as np
from export.triton_models._common import input_array, parameters, response

from ensemble import interface as api
from ensemble.rule import VerdictRule, decide, rgb_anomalous, rgb_confidence


class TritonPythonModel:
    def initialize(self, args):
        self.rule = VerdictRule.from_json(parameters(args)["rule"])

    def execute(self, requests):
        # one decide() over the whole dynamic batch, then split per request
        scores = [input_array(r, api.RGB_SCORE).reshape(-1) for r in requests]
        probs = [input_array(r, api.CT_PROBS) for r in requests]
        sizes = [len(s) for s in scores]
        threshold = np.float32(self.rule.rgb_threshold)
        if all(p is not None for p in probs):
            d = decide(self.rule, np.concatenate(probs), np.concatenate(scores))
            verdict, confidence = d.verdict, d.confidence
        else:
            score = np.concatenate(scores)
            verdict = np.where(rgb_anomalous(self.rule, score), 2, 0).astype(np.int32)
            confidence = rgb_confidence(score, self.rule.rgb_threshold)  # the RGB half's own confidence
            for i, (p, s) in enumerate(zip(probs, scores)):
                if p is not None:  # a mixed batch: decide those that have both halves fully
                    a = sum(sizes[:i])
                    part = decide(self.rule, p, s)
                    verdict[a : a + len(s)], confidence[a : a + len(s)] = part.verdict, part.confidence
        bounds = np.cumsum([0, *sizes])
        return [response({api.VERDICT: verdict[a:b, None], api.CONFIDENCE: confidence[a:b, None],
                          api.RGB_THRESHOLD: np.full((b - a, 1), threshold, np.float32)})
                for a, b in zip(bounds[:-1], bounds[1:])]
