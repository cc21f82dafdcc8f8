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

import io
import multiprocessing as mp
import os
import platform
import time

import numpy as np
import onnxruntime as ort
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode
from torchvision import transforms as T

from client.explain.gradcam import WithMeta, target_layer
from core import interface as api
from core.decode import decode_ct, sniff
from core.facts import ServingFacts
from serving.runtime import available_cores, ct_tensor, rgb_tensor


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
    model = next(
        (line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), platform.processor()
    )
    flags = next((line.split(":", 1)[1] for line in lines if line.startswith("flags")), "")
    return model, set(flags.split())


def instruction_set() -> str:
    """The vector instructions that decide this CPU's speed, as every figure names them:
    "AVX-512 VNNI + AMX", "AVX-512 VNNI", "AVX-512 (no VNNI)", "AVX2 + AVX-VNNI" or "AVX2 (no VNNI)"."""
    _, flags = _cpuinfo()
    if "avx512f" in flags:
        amx = " + AMX" if "amx_int8" in flags else ""
        return "AVX-512 VNNI" + amx if "avx512_vnni" in flags else "AVX-512 (no VNNI)" + amx
    if "avx2" in flags:
        return "AVX2 + AVX-VNNI" if "avx_vnni" in flags else "AVX2 (no VNNI)"
    return "no AVX2"


def machine() -> dict:
    model, flags = _cpuinfo()
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "instruction_set": instruction_set(),
        "avx2": "avx2" in flags,
        "avx512f": "avx512f" in flags,
        "vnni": "avx512_vnni" in flags or "avx_vnni" in flags,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def sgemm_gflops(n: int = 2048, seconds: float = 2.0) -> float:
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((n, n), np.float32), rng.standard_normal((n, n), np.float32)
    per_call, _ = timed(lambda: a @ b, seconds)
    return 2 * n**3 / per_call / 1e9


def flops_per_image(graph: torch.nn.Module, inputs: tuple) -> float:

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        graph(*inputs)
    return counter.get_total_flops() / inputs[0].shape[0]


def _batches(array: np.ndarray, batch: int) -> list[np.ndarray]:
    reps = int(np.ceil(batch / len(array)))
    return np.concatenate([array] * reps)[:batch]


def ort_cells_per_s(
    ct_onnx,
    rgb_onnx,
    ct_x: np.ndarray,
    meta: np.ndarray,
    rgb_x: np.ndarray,
    batch: int,
    seconds: float,
    threads: int = 0,
) -> dict:
    """ONNX Runtime on preprocessed tensors: one CT run and one RGB run per batch of cells."""

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    ct = ort.InferenceSession(str(ct_onnx), opts, providers=["CPUExecutionProvider"])
    rgb = ort.InferenceSession(str(rgb_onnx), opts, providers=["CPUExecutionProvider"])
    feeds_ct = {api.CT_TENSOR: _batches(ct_x, batch), api.CT_META: _batches(meta, batch)}
    feeds_rgb = {api.RGB_TENSOR: _batches(rgb_x, batch)}
    t_ct, _ = timed(lambda: ct.run(None, feeds_ct), seconds / 2)
    t_rgb, _ = timed(lambda: rgb.run(None, feeds_rgb), seconds / 2)
    return {
        "batch": batch,
        "cells_per_s": batch / (t_ct + t_rgb),
        "ct_images_per_s": batch / t_ct,
        "rgb_images_per_s": batch / t_rgb,
    }


def ct_images_per_s_and_probs(
    session: ort.InferenceSession, x: np.ndarray, meta: np.ndarray, batch: int, seconds: float
) -> tuple[float, np.ndarray]:
    """A CT classifier session's images/s on batches of `batch` of these inputs, and its
    probabilities for all of them (run 32 at a time), for the throughput and accuracy of one file."""
    feeds = {api.CT_TENSOR: np.resize(x, (batch, *x.shape[1:])), api.CT_META: np.resize(meta, (batch, meta.shape[1]))}
    per_call, _ = timed(lambda: session.run(None, feeds), seconds)
    probs = np.concatenate(
        [
            session.run(None, {api.CT_TENSOR: x[i : i + 32], api.CT_META: meta[i : i + 32]})[0]
            for i in range(0, len(x), 32)
        ]
    )
    return batch / per_call, probs


def torch_cells_per_s(pipeline, ct_x, meta, rgb_x, batch: int, seconds: float) -> dict:
    """PyTorch eager on preprocessed tensors (the served graphs: probabilities + CAM, score + map)."""
    ct, m, rgb = (torch.from_numpy(_batches(a, batch)) for a in (ct_x, meta, rgb_x))
    with torch.no_grad():
        t_ct, _ = timed(lambda: pipeline.ct_graph(ct, m), seconds / 2)
        t_rgb, _ = timed(lambda: pipeline.rgb_graph(rgb), seconds / 2)
    return {
        "batch": batch,
        "cells_per_s": batch / (t_ct + t_rgb),
        "ct_images_per_s": batch / t_ct,
        "rgb_images_per_s": batch / t_rgb,
    }


def original_cells_per_s(pipeline, cells, seconds: float, threads: int = 2) -> dict:
    """The original system's per-cell path, as its own code ran it (batch 1, PyTorch eager,
    `threads` torch threads), on the same networks:

    - the CT slice decoded whole by Pillow (pydicom for DICOM), made a tensor, resized to the
      network's input by torchvision `Resize` on the full-size tensor, normalised;
    - the classifier forward and backward by pytorch-grad-cam's GradCAM, then one more
      forward for the probabilities;
    - the photo decoded whole, made a tensor, resized, and the autoencoder run twice (once
      for the anomaly score, once for the error map).

    No crop: the original resized the whole image. Returns cells/s and the seconds per step.
    """

    from pytorch_grad_cam import GradCAM  # noqa: PLC0415 - optional heavy dependency, only for the audit path

    model = pipeline.ct_graph.classifier
    rgb_model = pipeline.rgb_graph
    ct_size, rgb_size = pipeline.ct_facts.input_size, pipeline.rgb_facts.input_size
    norm = pipeline.ct_facts.normalization
    ct_tf = T.Compose([T.Resize((ct_size, ct_size), antialias=True), T.Normalize([norm.mean], [norm.std])])
    rgb_tf = T.Resize((rgb_size, rgb_size), antialias=True)
    to_tensor = T.ToTensor()
    steps = {"decode": 0.0, "resize": 0.0, "ct_network_and_gradcam": 0.0, "rgb_network": 0.0}
    i = [0]

    def ct_image(data: bytes) -> Image.Image:
        if sniff(data) in ("jpeg", "png"):
            return Image.open(io.BytesIO(data)).convert("L")
        pixels = decode_ct(data)  # 16-bit TIFF, DICOM: to 8 bits, as the original's PIL pipeline had them
        return Image.fromarray((pixels >> 8).astype(np.uint8) if pixels.dtype == np.uint16 else pixels)

    def one():
        cell = cells[i[0] % len(cells)]
        i[0] += 1
        t0 = time.perf_counter()
        ct_pil = ct_image(cell.ct)
        ct_pil.load()
        photo = Image.open(io.BytesIO(cell.rgb)).convert("RGB")
        t1 = time.perf_counter()
        ct = ct_tf(to_tensor(ct_pil))[None]
        rgb = rgb_tf(to_tensor(photo))[None]
        t2 = time.perf_counter()
        meta = torch.tensor([cell.meta], dtype=torch.float32)
        with GradCAM(model=WithMeta(model, meta), target_layers=[target_layer(model)]) as cam:
            cam(input_tensor=ct, targets=None)
        with torch.no_grad():
            torch.softmax(model(ct, meta), 1)
        t3 = time.perf_counter()
        with torch.no_grad():
            rgb_model(rgb)  # the anomaly score
            rgb_model(rgb)  # the error map
        t4 = time.perf_counter()
        for k, dt in zip(steps, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            steps[k] += dt

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        per_cell, calls = timed(one, seconds, min_calls=4)
    finally:
        torch.set_num_threads(before)
    done = calls + 1  # timed() makes one warm-up call, counted in steps too
    return {
        "batch": 1,
        "threads": threads,
        "cells_per_s": 1 / per_cell,
        "cells": calls,
        "seconds_per_step": {k: v / done for k, v in steps.items()},
    }


def _e2e_worker(args):
    """One process of `inprocess_cells_per_s`: its own ONNX Runtime sessions (one thread), its cells."""
    ct_onnx, rgb_onnx, cells, ct_info, rgb_info, batch, seconds, barrier = args

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    ct = ort.InferenceSession(str(ct_onnx), opts, providers=["CPUExecutionProvider"])
    rgb = ort.InferenceSession(str(rgb_onnx), opts, providers=["CPUExecutionProvider"])

    def one_batch(k):
        chosen = [cells[(k + j) % len(cells)] for j in range(batch)]
        feeds = {
            api.CT_TENSOR: np.stack([ct_tensor(c.ct, ct_info) for c in chosen]),
            api.CT_META: np.array([c.meta for c in chosen], np.float32),
        }
        ct.run(None, feeds)
        rgb.run(None, {api.RGB_TENSOR: np.stack([rgb_tensor(c.rgb, rgb_info) for c in chosen])})

    one_batch(0)  # warm-up, before the common start
    barrier.wait()
    start = time.perf_counter()
    done = 0
    while time.perf_counter() - start < seconds:
        one_batch(done)
        done += batch
    return done, time.perf_counter() - start


def inprocess_cells_per_s(
    ct_onnx,
    rgb_onnx,
    cells,
    ct_info: ServingFacts,
    rgb_info: ServingFacts,
    seconds: float,
    batch: int = 8,
    processes: int | None = None,
) -> dict:
    """The best in-process end-to-end pipeline on these cores, to compare Triton against: one
    process per core, each decoding, preprocessing and running both networks (ONNX Runtime,
    one thread) on batches of `batch` cells from the encoded images, all at once."""

    processes = processes or available_cores()
    context = mp.get_context("spawn")
    with context.Manager() as manager, context.Pool(processes) as pool:
        barrier = manager.Barrier(processes)  # all start together, once each has loaded and warmed up
        jobs = [
            (ct_onnx, rgb_onnx, cells[p::processes] or cells, ct_info, rgb_info, batch, seconds, barrier)
            for p in range(processes)
        ]
        results = pool.map(_e2e_worker, jobs)
    cells_done = sum(n for n, _ in results)
    wall = max(t for _, t in results)
    return {"processes": processes, "batch": batch, "cells": cells_done, "cells_per_s": cells_done / wall}


def preprocess_cells_per_s(cells, ct_info: ServingFacts, rgb_info: ServingFacts, seconds: float) -> dict:
    """Decoding and preprocessing alone (what the server does before the networks), per image kind."""

    i, j = [0], [0]

    def ct():
        ct_tensor(cells[i[0] % len(cells)].ct, ct_info)
        i[0] += 1

    def rgb():
        rgb_tensor(cells[j[0] % len(cells)].rgb, rgb_info)
        j[0] += 1

    t_ct, _ = timed(ct, seconds / 2)
    t_rgb, _ = timed(rgb, seconds / 2)
    return {
        "batch": 1,
        "cells_per_s": 1 / (t_ct + t_rgb),
        "ct_images_per_s": 1 / t_ct,
        "rgb_images_per_s": 1 / t_rgb,
        "ct_bytes": sum(len(c.ct) for c in cells) // len(cells),
        "rgb_bytes": sum(len(c.rgb) for c in cells) // len(cells),
    }
