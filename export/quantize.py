"""Lower-precision variants of the exported networks.

FP16 (for GPU deployments: the onnxruntime CUDA/TensorRT providers or TensorRT engines):
every float tensor and weight in half precision, the inputs and outputs kept float32 so
the interface is unchanged. It runs on the CPU too (parity is checked there), but slowly.

INT8: static QDQ quantisation of the convolutions.

Weights per output channel, activations per tensor (uint8), calibrated on images of the
data the run was trained on (its Validation tree where it has one), preprocessed exactly
as the server does. Only convolutions are quantised: they are nearly all of the FLOPs, and
the head, the in-graph Grad-CAM and the autoencoder's score stay in float32. The integer
format is chosen so that the INT8 network computes the same numbers on every x86-64 CPU;
`quantize_int8` says how and why.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process
from onnxruntime.transformers.float16 import convert_float_to_float16

from core import interface as api
from core.aihub import scan
from core.facts import ServingFacts
from serving.runtime import ct_tensor, rgb_tensor

CALIBRATION_CELLS = 64


def calibration_tensors(
    data_root: str | Path, ct: ServingFacts | None, rgb: ServingFacts | None, n: int = CALIBRATION_CELLS
) -> dict[str, np.ndarray]:
    """Preprocessed CT (when `ct` is given) and RGB (when `rgb` is given) inputs of up to n
    images each from the Validation tree of `data_root` (all images where there is none), spread
    evenly over the set."""

    root = Path(data_root)
    if not root.is_dir():
        raise ValueError(f"calibration data {root} is not a folder: give --calibration DIR (an AI-Hub-layout folder)")
    ds = scan(root, progress=False)

    def pick(records):
        chosen = [r for r in records if getattr(r, "subset", "") == "Validation"] or list(records)
        if not chosen:
            raise ValueError(f"no images in {root} to calibrate on")
        return chosen[:: max(1, len(chosen) // n)][:n]

    out = {}
    if ct is not None:
        cts = pick(ds.ct)
        out[api.CT_TENSOR] = np.stack([ct_tensor(r.path.read_bytes(), ct) for r in cts])
        out[api.CT_META] = np.array([r.meta for r in cts], np.float32)
    if rgb is not None:
        out[api.RGB_TENSOR] = np.stack([rgb_tensor(r.path.read_bytes(), rgb) for r in pick(ds.rgb)])
    return out


def quantize_int8(src: str | Path, dst: str | Path, feeds: dict[str, np.ndarray]) -> Path:
    """Write the INT8 (QDQ) model of `src` to `dst`, calibrated on `feeds` (the model's inputs)."""

    class Reader(CalibrationDataReader):
        """The calibration inputs in batches of 8."""

        def __init__(self):
            n = len(next(iter(feeds.values())))
            self.batches = iter([{k: v[i : i + 8] for k, v in feeds.items()} for i in range(0, n, 8)])

        def get_next(self):
            return next(self.batches, None)

    reader = Reader()
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)  # ONNX shape inference suffices for CNNs
        quantize_static(
            str(prepared),
            str(dst),
            reader,
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["Conv"],
            per_channel=True,
            **_integer_format(onnx.load(str(prepared))),
        )
    return Path(dst)


def _integer_format(model) -> dict:
    """The integer types of the INT8 networks: the same answers on every x86-64 CPU.

    ONNX Runtime multiplies uint8 activations by int8 weights (U8S8). With AVX-512 VNNI
    (VPDPBUSD) the products are summed in 32 bits; without VNNI (AVX2, AVX-512 without VNNI)
    its kernels use VPMADDUBSW, which adds two products into 16 bits and saturates when
    both are large (255 x 127 x 2 > 32767). That is what made INT8 differ from FP32 by 0.14
    in probability, and agree on the top class on only 92.5% of slices, on AVX2 machines
    while a VNNI machine was right. So:

    - every convolution but the first: int8 weights in 7 bits (`reduce_range`, -64..64),
      and 255 x 64 x 2 = 32640 fits in 16 bits: no saturation, still the fast U8S8 kernels;
    - the first convolution reads the image, where the 7-bit weights of a 7 x 7 x 1 kernel
      cost the most precision (its 49 taps are all it has): uint8 weights in 8 bits (U8U8),
      whose kernels widen to 16 bits before multiplying and cannot saturate. It is a few
      per cent of the FLOPs, so the slower U8U8 kernel costs little.

    The integer arithmetic is then exact on both kinds of CPU, and an INT8 model gives the
    same outputs (up to float rounding outside the convolutions) wherever it runs: checked
    by running a model under an AVX2-only CPU emulation against a VNNI machine
    (docs/performance.md).
    """

    first = next(n for n in model.graph.node if n.op_type == "Conv")
    return {
        "activation_type": QuantType.QUInt8,
        "weight_type": QuantType.QInt8,
        "reduce_range": True,
        "extra_options": {
            "TensorQuantOverrides": {
                first.input[1]: [{"axis": 0, "quant_type": QuantType.QUInt8, "reduce_range": False}]
            }
        },
    }


def to_fp16(src: str | Path, dst: str | Path) -> Path:
    """Write the half-precision model of `src` to `dst` (float32 inputs and outputs)."""

    onnx.save(convert_float_to_float16(onnx.load(str(src)), keep_io_types=True), str(dst))
    return Path(dst)
