"""RGB_IMAGE (encoded PNG/JPEG) -> RGB_TENSOR, with the training preprocessing."""

from serving.triton_models._common import PreprocessModel, input_array

from core import interface as api
from serving.runtime import rgb_tensors


class TritonPythonModel(PreprocessModel):
    def tensors(self, request) -> dict:
        return {api.RGB_TENSOR: rgb_tensors(input_array(request, api.RGB_IMAGE), self.facts, self.limits)}
