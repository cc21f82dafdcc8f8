"""An ONNX model served by ONNX Runtime inside the Python backend (`--runtime python-ort`).

All requests Triton hands over in one call (a dynamic batch) run as one ONNX Runtime batch.
"""

from pathlib import Path

from serving.triton_models._common import Refusals, input_array, parameters, response

from serving.runtime import OrtRunner


class TritonPythonModel:
    def initialize(self, args):
        params = parameters(args)
        path = Path(args["model_repository"]) / args["model_version"] / params.get("onnx_file", "model.onnx")
        self.runner = OrtRunner(path, threads=int(params.get("intra_op_threads", "0")))
        self.refusals = Refusals(args["model_name"])

    def execute(self, requests):
        batch = [{n: input_array(r, n) for n in self.runner.inputs} for r in requests]
        return [
            self.refusals.error(out) if isinstance(out, Exception) else response(out)
            for out in self.runner.run_many(batch)
        ]
