"""The in-process measurements: the machine's own limit, model FLOPs, and the baselines.

- `sgemm_gflops`: float32 matrix multiply throughput with all cores (numpy/BLAS), the
  ceiling the achieved GFLOP/s of the networks are compared to.
- `flops_per_image`: FLOPs of one forward pass of each served graph (PyTorch's
  FlopCounterMode: convolutions and matrix multiplies, 2 per multiply-add).
- Baselines on the same cells and models: ONNX Runtime on preprocessed tensors, PyTorch
  eager on preprocessed tensors, and the original system's way (one cell at a time in
  PyTorch from the encoded images, Grad-CAM recomputed with a backward pass by
  pytorch-grad-cam, then the autoencoder).
"""
from __future__ import annotations

import os
import platform
import time

import numpy as np
import torch


def timed(fn, min_seconds: float, min_calls: int = 2) -> tuple[float, int]:
    """(seconds per call, calls) after one warm-up call, over at least `min_seconds`."""
    fn()
    calls, start = 0, time.perf_counter()
    while calls < min_calls or time.perf_counter() - start < min_seconds:
        fn()
        calls += 1
    return (time.perf_counter() - start) / calls, calls


def _cpuinfo() -> tuple[str, set[str]]:
    lines = open("/proc/cpuinfo").read().splitlines() if os.path.exists("/proc/cpuinfo") else []
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), platform.processor())
    flags = next((line.split(":", 1)[1] for line in lines if line.startswith("flags")), "")
    return model, set(flags.split())


def instruction_set() -> str:
    """The vector instructions that decide this CPU's speed, as every figure names them:
    "AVX-512 VNNI", "AVX-512 (no VNNI)", "AVX2 + AVX-VNNI" or "AVX2 (no VNNI)"."""
    _, flags = _cpuinfo()
    if "avx512f" in flags:
        return "AVX-512 VNNI" if "avx512_vnni" in flags else "AVX-512 (no VNNI)"
    if "avx2" in flags:
        return "AVX2 + AVX-VNNI" if "avx_vnni" in flags else "AVX2 (no VNNI)"
    return "no AVX2"


def machine() -> dict:
    model, flags = _cpuinfo()
    return {"cpu": model, "cores": os.cpu_count(), "instruction_set": instruction_set(), "avx2": "avx2" in flags,
            "avx512f": "avx512f" in flags, "vnni": "avx512_vnni" in flags or "avx_vnni" in flags,
            "python": platform.python_version(), "torch": torch.__version__, "torch_threads": torch.get_num_threads()}


def sgemm_gflops(n: int = 2048, seconds: float = 2.0) -> float:
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((n, n), np.float32), rng.standard_normal((n, n), np.float32)
    per_call, _ = timed(lambda: a @ b, seconds)
    return 2 * n**3 / per_call / 1e9


def flops_per_image(graph: torch.nn.Module, inputs: tuple) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        graph(*inputs)
    return counter.get_total_flops() / inputs[0].shape[0]


def _batches(array: np.ndarray, batch: int) -> list[np.ndarray]:
    reps = int(np.ceil(batch / len(array)))
    return np.concatenate([array] * reps)[:batch]


def ort_cells_per_s(ct_onnx, rgb_onnx, ct_x: np.ndarray, meta: np.ndarray, rgb_x: np.ndarray, batch: int, seconds: float,
                    threads: int = 0) -> dict:
    """ONNX Runtime on preprocessed tensors: one CT run and one RGB run per batch of cells."""
    import onnxruntime as ort

    from ensemble import interface as api

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    ct = ort.InferenceSession(str(ct_onnx), opts, providers=["CPUExecutionProvider"])
    rgb = ort.InferenceSession(str(rgb_onnx), opts, providers=["CPUExecutionProvider"])
    feeds_ct = {api.CT_TENSOR: _batches(ct_x, batch), api.CT_META: _batches(meta, batch)}
    feeds_rgb = {api.RGB_TENSOR: _batches(rgb_x, batch)}
    t_ct, _ = timed(lambda: ct.run(None, feeds_ct), seconds / 2)
    t_rgb, _ = timed(lambda: rgb.run(None, feeds_rgb), seconds / 2)
    return {"batch": batch, "cells_per_s": batch / (t_ct + t_rgb), "ct_images_per_s": batch / t_ct, "rgb_images_per_s": batch / t_rgb}


def torch_cells_per_s(pipeline, ct_x, meta, rgb_x, batch: int, seconds: float) -> dict:
    """PyTorch eager on preprocessed tensors (the served graphs: probabilities + CAM, score + map)."""
    ct, m, rgb = (torch.from_numpy(_batches(a, batch)) for a in (ct_x, meta, rgb_x))
    with torch.no_grad():
        t_ct, _ = timed(lambda: pipeline.ct_graph(ct, m), seconds / 2)
        t_rgb, _ = timed(lambda: pipeline.rgb_graph(rgb), seconds / 2)
    return {"batch": batch, "cells_per_s": batch / (t_ct + t_rgb), "ct_images_per_s": batch / t_ct, "rgb_images_per_s": batch / t_rgb}


def original_cells_per_s(pipeline, cells, seconds: float) -> dict:
    """The original system's path: per cell, decode + preprocess, the CT model at batch 1,
    pytorch-grad-cam GradCAM (a backward pass), then the autoencoder at batch 1."""
    from pytorch_grad_cam import GradCAM

    from client.explain.gradcam import WithMeta, target_layer
    from export.serving import ct_tensor, rgb_tensor

    model = pipeline.ct_graph.classifier
    rgb_model = pipeline.rgb_graph
    i = [0]

    def one():
        cell = cells[i[0] % len(cells)]
        i[0] += 1
        ct = torch.from_numpy(ct_tensor(cell.ct, pipeline.ct_info))[None]
        meta = torch.tensor([cell.meta], dtype=torch.float32)
        with GradCAM(model=WithMeta(model, meta), target_layers=[target_layer(model)]) as cam:
            cam(input_tensor=ct, targets=None)
        with torch.no_grad():
            torch.softmax(model(ct, meta), 1)
            rgb_model(torch.from_numpy(rgb_tensor(cell.rgb, pipeline.rgb_info))[None])

    per_cell, calls = timed(one, seconds)
    return {"batch": 1, "cells_per_s": 1 / per_cell, "cells": calls}


def preprocess_cells_per_s(cells, ct_info: dict, rgb_info: dict, seconds: float) -> dict:
    """Decoding and preprocessing alone (what the server does before the networks), per image kind."""
    from export.serving import ct_tensor, rgb_tensor

    i, j = [0], [0]

    def ct():
        ct_tensor(cells[i[0] % len(cells)].ct, ct_info)
        i[0] += 1

    def rgb():
        rgb_tensor(cells[j[0] % len(cells)].rgb, rgb_info)
        j[0] += 1

    t_ct, _ = timed(ct, seconds / 2)
    t_rgb, _ = timed(rgb, seconds / 2)
    return {"batch": 1, "cells_per_s": 1 / (t_ct + t_rgb), "ct_images_per_s": 1 / t_ct, "rgb_images_per_s": 1 / t_rgb,
            "ct_bytes": sum(len(c.ct) for c in cells) // len(cells), "rgb_bytes": sum(len(c.rgb) for c in cells) // len(cells)}
