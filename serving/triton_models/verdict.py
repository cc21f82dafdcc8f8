"""The networks' results (+ CT_META) -> VERDICT, CONFIDENCE, RGB_THRESHOLD by the rule of `ensemble/`,
and the networks' results handed on as the public outputs.

Inputs are the internal tensors `ct_probs`, `rgb_score`, `ct_ood`, `rgb_ood`, `ct_cam`,
`rgb_error_map` (core.interface.internal) and CT_META; outputs the public tensors. Every
public output of `inspect` and `inspect_rgb` comes from this step, so Triton runs it (and so
decides and counts the cell) for any subset of outputs a client asks for
(core.interface.PASSED_THROUGH says why).

The resolved rule (thresholds included) is the config parameter `rule` of this version's
release (`rule@R`), and MODEL_VERSIONS is its `release@R`: the release and the networks'
checkpoint digests, in every answer. ct_probs is optional: without it (the `inspect_rgb`
ensemble) only the RGB half is decided; without rgb_score (`inspect_ct`) nothing is decided,
the CT outputs are handed on with MODEL_VERSIONS. CT_META
gives the battery type the metrics are labelled with. ct_ood and rgb_ood make the verdict 4
(not_inspectable) where either is >= 1.

Metrics (Triton's custom metrics API, on Triton's metrics port beside `nv_inference_*`):
- `battery_verdicts_total{verdict, battery_type}`: cells decided by `inspect` (verdict
  `not_inspectable` included); `inspect_rgb` decides only a photo, which is not counted here;
- `battery_not_inspectable_total{input}`: cells refused, by the input that was out of distribution (`ct`, `rgb`);
- `battery_ct_class_total{ct_class}`: the CT classifier's top class, per cell with a CT slice;
- `battery_rgb_anomaly_score`: histogram of the RGB scores, buckets at multiples of the threshold;
- `battery_rgb_threshold`: the threshold in force (a gauge, for the dashboard's drift panel);
- `battery_release_verdicts_total{release, verdict}`: cells decided by each release, the staged
  one's shadow and comparison traffic included.

The series above `battery_release_verdicts_total` describe the line: only the release in
service counts into them (the manifest beside the models says which; re-read when it
changes), so shadow traffic to a staged release never shows as line cells.
"""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils
from serving.triton_models._common import input_array, parameters, response

from core import interface as api
from ensemble.rule import VerdictRule
from serving.runtime import score_buckets, verdict_outputs, verdict_tally


class VerdictMetrics:
    """The verdict model's Prometheus series; one `Metric` per label set, made on first use."""

    def __init__(self, rule: VerdictRule):
        self.rule = rule
        self.verdicts = pb_utils.MetricFamily(
            name="battery_verdicts_total",
            description="Cells decided, by verdict and battery type",
            kind=pb_utils.MetricFamily.COUNTER,
        )
        self.classes = pb_utils.MetricFamily(
            name="battery_ct_class_total",
            description="Cells by the CT classifier's top class",
            kind=pb_utils.MetricFamily.COUNTER,
        )
        self.score_family = pb_utils.MetricFamily(
            name="battery_rgb_anomaly_score",
            description="RGB anomaly scores (buckets at multiples of the threshold)",
            kind=pb_utils.MetricFamily.HISTOGRAM,
        )
        self.threshold_family = pb_utils.MetricFamily(
            name="battery_rgb_threshold",
            description="RGB anomaly-score threshold in force",
            kind=pb_utils.MetricFamily.GAUGE,
        )
        self.scores = self.score_family.Metric(labels={}, buckets=score_buckets(rule))
        self.refused = pb_utils.MetricFamily(
            name="battery_not_inspectable_total",
            description="Cells refused as not inspectable, by the input out of distribution",
            kind=pb_utils.MetricFamily.COUNTER,
        )
        self.threshold = self.threshold_family.Metric(labels={})
        self.by_release = pb_utils.MetricFamily(
            name="battery_release_verdicts_total",
            description="Cells decided, by the release that decided them (shadow and comparison traffic included)",
            kind=pb_utils.MetricFamily.COUNTER,
        )
        self.series = {}
        for source in ("ct", "rgb"):  # at zero from the start, so a rate over it exists before the first refusal
            self._count(self.refused, {"input": source}, 0)

    def _count(self, family, labels: dict, n: int) -> None:
        key = (id(family), tuple(sorted(labels.items())))
        if key not in self.series:
            self.series[key] = family.Metric(labels=labels)
        self.series[key].increment(n)

    def record_release(self, release: int, tally: dict) -> None:
        for (verdict, _), n in _counts(tally["verdicts"]).items():
            self._count(self.by_release, {"release": str(release), "verdict": verdict}, n)

    def record(self, tally: dict) -> None:
        self.threshold.set(self.rule.rgb_threshold)
        for (verdict, battery_type), n in _counts(tally["verdicts"]).items():
            self._count(self.verdicts, {"verdict": verdict, "battery_type": battery_type}, n)
        for ct_class, n in _counts(tally["ct_classes"]).items():
            self._count(self.classes, {"ct_class": ct_class}, n)
        for source, n in _counts(tally.get("refused", ())).items():
            self._count(self.refused, {"input": source}, n)
        for score in tally["scores"]:
            self.scores.observe(score)


def _counts(items) -> dict:
    out = {}
    for item in items:
        out[item] = out.get(item, 0) + 1
    return out


class ServingRelease:
    """Whether this model version is the release `inspect` serves: the repository's manifest says,
    re-read when it changes (a promotion or rollback rewrites it; nothing is reloaded)."""

    def __init__(self, args):
        self.release = int(args["model_version"])
        self.path = Path(args["model_repository"]).parent / "manifest.json"
        self.stamp, self.serving = None, True

    def __call__(self) -> bool:
        try:
            stamp = self.path.stat().st_mtime_ns
        except OSError:
            return True  # a repository without a manifest has one release
        if stamp != self.stamp:
            self.stamp = stamp
            try:
                self.serving = int(json.loads(self.path.read_text()).get("serving", self.release)) == self.release
            except (OSError, ValueError, TypeError):
                pass  # a manifest being rewritten: the last answer stands
        return self.serving


class TritonPythonModel:
    def initialize(self, args):
        params = parameters(args)
        self.rule = VerdictRule.from_json(params["rule"])
        self.metrics = VerdictMetrics(self.rule)
        self.serving = ServingRelease(args)
        release = params.get(api.RELEASE_PARAMETER, json.dumps({"release": int(args["model_version"])}))
        self.versions = np.array([release.encode()], dtype=np.object_)

    def execute(self, requests):
        given = [{n: input_array(r, api.internal(n)) for n in api.PASSED_THROUGH} for r in requests]
        # inspect_ct's requests (no rgb_score) are only handed on; a dynamic batch may mix both kinds
        decided = [i for i, g in enumerate(given) if g[api.RGB_SCORE] is not None]
        answers = [None if g[api.RGB_SCORE] is not None else self._handed_on(g) for g in given]
        if not decided:
            return answers
        given_d = [given[i] for i in decided]
        probs = [g[api.CT_PROBS] for g in given_d]
        metas = [input_array(requests[i], api.CT_META) for i in decided]
        scores = [g[api.RGB_SCORE] for g in given_d]
        ct_oods = [g[api.CT_OOD] for g in given_d]
        rgb_oods = [g[api.RGB_OOD] for g in given_d]
        outputs = verdict_outputs(self.rule, probs, scores, ct_oods, rgb_oods)
        try:
            tally = verdict_tally(self.rule, probs, metas, outputs, scores, ct_oods, rgb_oods)
            self.metrics.record_release(self.serving.release, tally)
            if self.serving():
                self.metrics.record(tally)
        except Exception as e:  # counting must never cost a cell its answer
            pb_utils.Logger.log_warn(f"verdict metrics not recorded: {e}")
        for i, out, g in zip(decided, outputs, given_d):
            passed = {n: a for n, a in g.items() if a is not None}
            answers[i] = response(out | passed | self._versions(len(out[api.VERDICT])))
        return answers

    def _versions(self, n: int) -> dict:
        return {api.MODEL_VERSIONS: np.repeat(self.versions[None], n, axis=0)}

    def _handed_on(self, given: dict):
        n = len(next(a for a in given.values() if a is not None))
        return response({k: a for k, a in given.items() if a is not None} | self._versions(n))
