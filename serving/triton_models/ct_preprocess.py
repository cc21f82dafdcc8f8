"""CT_IMAGE (encoded PNG/JPEG/TIFF/DICOM) + CT_META -> CT_TENSOR, with the training preprocessing."""

from serving.triton_models._common import PreprocessModel, input_array

from core import interface as api
from serving.runtime import check_meta, ct_tensors


class TritonPythonModel(PreprocessModel):
    def tensors(self, request) -> dict:
        check_meta(input_array(request, api.CT_META))
        return {api.CT_TENSOR: ct_tensors(input_array(request, api.CT_IMAGE), self.facts, self.limits)}
