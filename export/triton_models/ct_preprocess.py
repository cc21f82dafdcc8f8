"""CT_IMAGE (encoded PNG/JPEG/TIFF/DICOM) + CT_META -> CT_TENSOR, with the training preprocessing."""
from export.triton_models._common import PreprocessModel, input_array

from ensemble import interface as api
from export.serving import check_meta, ct_tensors


class TritonPythonModel(PreprocessModel):
    def tensors(self, request) -> dict:
        check_meta(input_array(request, api.CT_META))
        return {api.CT_TENSOR: ct_tensors(input_array(request, api.CT_IMAGE), self.info, self.limits)}
