"""Shared by the Python-backend adapters; importable only inside the Python-backend stub."""
import json

import numpy as np
import triton_python_backend_utils as pb_utils

from export.serving import RequestError, limits_from


def parameters(args) -> dict:
    config = json.loads(args["model_config"])
    return {k: v["string_value"] for k, v in config.get("parameters", {}).items()}


def error(message: str):
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, pb_utils.TritonError.INVALID_ARG))


def response(outputs: dict):
    return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(n, np.ascontiguousarray(a)) for n, a in outputs.items()])


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
        self.info = json.loads(params.get("serving_info", "null"))
        self.infos = {k[: -len("_serving_info")]: json.loads(v) for k, v in params.items() if k.endswith("_serving_info")}
        self.limits = limits_from(params)

    def tensors(self, request) -> dict:
        raise NotImplementedError

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                responses.append(response(self.tensors(request)))
            except RequestError as e:
                responses.append(error(str(e)))
        return responses
