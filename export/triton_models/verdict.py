"""CT_PROBS + RGB_SCORE -> VERDICT, CONFIDENCE, RGB_THRESHOLD by the rule of `ensemble/`.

The resolved rule (thresholds included) is the config parameter `rule`. CT_PROBS is
optional: without it (the `inspect_rgb` ensemble) only the RGB half is decided.
"""
from export.triton_models._common import input_array, parameters, response

from ensemble import interface as api
from ensemble.rule import VerdictRule
from export.serving import verdict_outputs


class TritonPythonModel:
    def initialize(self, args):
        self.rule = VerdictRule.from_json(parameters(args)["rule"])

    def execute(self, requests):
        probs = [input_array(r, api.CT_PROBS) for r in requests]
        scores = [input_array(r, api.RGB_SCORE) for r in requests]
        return [response(out) for out in verdict_outputs(self.rule, probs, scores)]
