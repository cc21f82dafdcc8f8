"""CT_IMAGE (encoded PNG/JPEG/TIFF/DICOM) + CT_META -> CT_TENSOR, with the training preprocessing."""
import json

from export.triton_models._common import error, input_array, parameters, response

from ensemble import interface as api
from export.serving import RequestError, check_meta, ct_tensors, limits_from


class TritonPythonModel:
    def initialize(self, args):
        params = parameters(args)
        self.info = json.loads(params["serving_info"])
        self.limits = limits_from(params)

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                check_meta(input_array(request, api.CT_META))
                tensor = ct_tensors(input_array(request, api.CT_IMAGE), self.info, self.limits)
                responses.append(response({api.CT_TENSOR: tensor}))
            except RequestError as e:
                responses.append(error(str(e)))
        return responses
