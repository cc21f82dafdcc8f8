"""Lower-precision variants of the exported networks.

FP16 (for GPU deployments: the onnxruntime CUDA/TensorRT providers or TensorRT engines):
every float tensor and weight in half precision, the inputs and outputs kept float32 so
the interface is unchanged. It runs on the CPU too (parity is checked there), but slowly.

INT8: static QDQ quantisation of the convolutions.

Weights per output channel (int8), activations per tensor (uint8), calibrated on images of
the data the run was trained on (its Validation tree where it has one), preprocessed
exactly as the server does. Only convolutions are quantised: they are nearly all of the
FLOPs, and the head, the in-graph Grad-CAM and the autoencoder's score stay in float32,
which keeps the CT decisions of the quick models identical on the calibration cells
(measured: 2.7x faster at batch 8 on a 2-core AVX-512 VNNI machine).
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from ensemble import interface as api

CALIBRATION_CELLS = 64


def calibration_tensors(data_root: str | Path, ct_info: dict | None, rgb_info: dict | None, n: int = CALIBRATION_CELLS) -> dict[str, np.ndarray]:
    """Preprocessed CT (when ct_info is given) and RGB (when rgb_info is given) inputs of up to n
    images each from the Validation tree of `data_root` (all images where there is none), spread
    evenly over the set."""
    from export.serving import ct_tensor, rgb_tensor
    from training.data.aihub import scan

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
    if ct_info is not None:
        cts = pick(ds.ct)
        out[api.CT_TENSOR] = np.stack([ct_tensor(r.path.read_bytes(), ct_info) for r in cts])
        out[api.CT_META] = np.array([r.meta for r in cts], np.float32)
    if rgb_info is not None:
        out[api.RGB_TENSOR] = np.stack([rgb_tensor(r.path.read_bytes(), rgb_info) for r in pick(ds.rgb)])
    return out


def quantize_int8(src: str | Path, dst: str | Path, feeds: dict[str, np.ndarray]) -> Path:
    """Write the INT8 (QDQ) model of `src` to `dst`, calibrated on `feeds` (the model's inputs)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        """The calibration inputs in batches of 8."""

        def __init__(self):
            n = len(next(iter(feeds.values())))
            self.batches = iter([{k: v[i:i + 8] for k, v in feeds.items()} for i in range(0, n, 8)])

        def get_next(self):
            return next(self.batches, None)

    reader = Reader()
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)  # ONNX shape inference suffices for CNNs
        quantize_static(str(prepared), str(dst), reader, quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=["Conv"])
    return Path(dst)


def to_fp16(src: str | Path, dst: str | Path) -> Path:
    """Write the half-precision model of `src` to `dst` (float32 inputs and outputs)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    onnx.save(convert_float_to_float16(onnx.load(str(src)), keep_io_types=True), str(dst))
    return Path(dst)
