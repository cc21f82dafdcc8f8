"""Shared by the Python-backend adapters; importable only inside the Python-backend stub."""

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from core import interface as api
from core.decode import Limits
from core.facts import CONFIG_KEY, ServingFacts
from serving.runtime import RequestError


def parameters(args) -> dict:
    """The config parameters as this model version (its release) sees them (core.interface.release_view)."""
    config = json.loads(args["model_config"])
    return api.release_view(
        {k: v["string_value"] for k, v in config.get("parameters", {}).items()}, args["model_version"]
    )


def error(message: str):
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, pb_utils.TritonError.INVALID_ARG))


def response(outputs: dict):
    return pb_utils.InferenceResponse(
        output_tensors=[pb_utils.Tensor(n, np.ascontiguousarray(a)) for n, a in outputs.items()]
    )


class Refusals:
    """`battery_refused_total{model, reason}`: the requests this model refused (INVALID_ARGUMENT),
    by reason (core.interface.REFUSAL_REASONS); every reason at 0 from the start, so a rate over
    it exists before the first refusal. The instances of a model count into the same series."""

    def __init__(self, model: str):
        self.family = pb_utils.MetricFamily(
            name="battery_refused_total",
            description="Requests refused with INVALID_ARGUMENT, by the model that refused them and the reason",
            kind=pb_utils.MetricFamily.COUNTER,
        )
        self.metrics = {r: self.family.Metric(labels={"model": model, "reason": r}) for r in api.REFUSAL_REASONS}

    def error(self, e: RequestError):
        """The error response for `e`, counted."""
        reason = getattr(e, "reason", None)
        self.metrics[reason if reason in self.metrics else "not_an_image"].increment(1)
        return error(str(e))


def input_array(request, name: str):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


class PreprocessModel:
    """A preprocessing model: each request on its own, a bad one answered with its error.

    Subclasses say what a request becomes (`tensors`); the checkpoint's serving facts and
    the image limits come from the config parameters.
    """

    def initialize(self, args):
        params = parameters(args)
        suffix = "_" + CONFIG_KEY  # `preprocess` holds both: ct_serving_info, rgb_serving_info
        self.facts = ServingFacts.from_json(params[CONFIG_KEY]) if CONFIG_KEY in params else None
        self.both = {k[: -len(suffix)]: ServingFacts.from_json(v) for k, v in params.items() if k.endswith(suffix)}
        self.limits = Limits.from_parameters(params)
        self.refusals = Refusals(args["model_name"])

    def tensors(self, request) -> dict:
        raise NotImplementedError

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                responses.append(response(self.tensors(request)))
            except RequestError as e:
                responses.append(self.refusals.error(e))
        return responses
