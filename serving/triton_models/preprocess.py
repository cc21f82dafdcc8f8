"""CT_IMAGE + CT_META + RGB_IMAGE -> CT_TENSOR + RGB_TENSOR: the first step of `inspect`.

Both images of a cell are checked and prepared in one step, so a bad cell is refused
before any other step of the ensemble starts. (With one preprocessing step per image, a
request refused by one of them returns while the other branch is still running, and
tritonserver 2.51 then intermittently rejects a concurrent good request with "unexpected
number of string elements" for its RGB_IMAGE.)
"""

from serving.triton_models._common import PreprocessModel, input_array

from core import interface as api
from serving.runtime import cell_tensors


class TritonPythonModel(PreprocessModel):
    def tensors(self, request) -> dict:
        ct, rgb = cell_tensors(
            input_array(request, api.CT_META),
            input_array(request, api.CT_IMAGE),
            input_array(request, api.RGB_IMAGE),
            self.both["ct"],
            self.both["rgb"],
            self.limits,
        )
        return {api.CT_TENSOR: ct, api.RGB_TENSOR: rgb}
