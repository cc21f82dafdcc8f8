"""RGB_IMAGE (encoded PNG/JPEG) -> RGB_TENSOR, with the training preprocessing."""
from export.triton_models._common import PreprocessModel, input_array

from ensemble import interface as api
from export.serving import rgb_tensors


class TritonPythonModel(PreprocessModel):
    def tensors(self, request) -> dict:
        return {api.RGB_TENSOR: rgb_tensors(input_array(request, api.RGB_IMAGE), self.info, self.limits)}
