"""RGB_IMAGE (encoded PNG/JPEG) -> RGB_TENSOR, with the training preprocessing."""
import json

from export.triton_models._common import error, input_array, parameters, response

from ensemble import interface as api
from export.serving import RequestError, limits_from, rgb_tensors


class TritonPythonModel:
    def initialize(self, args):
        params = parameters(args)
        self.info = json.loads(params["serving_info"])
        self.limits = limits_from(params)

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                responses.append(response({api.RGB_TENSOR: rgb_tensors(input_array(request, api.RGB_IMAGE), self.info, self.limits)}))
            except RequestError as e:
                responses.append(error(str(e)))
        return responses
