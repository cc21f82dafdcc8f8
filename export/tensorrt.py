"""TensorRT engines for a repository written with `--runtime tensorrt`.

    python -m export repository --runs runs/standard --runtime tensorrt --precision int8 --out build/trt
    python -m export tensorrt build/trt            # on the GPU that will serve: writes <network>/1/model.plan

Each network's `1/model.onnx` becomes `1/model.plan` with one optimisation profile over the
batch axis (1 .. the config's max_batch_size, tuned for half of it). The precision follows
the repository's manifest:

- fp32: TF32 where the GPU has it (TensorRT's default);
- fp16: the FP16 ONNX, built with FP16 kernels allowed;
- int8: the QDQ ONNX (convolutions quantised and calibrated on validation images by
  `export.quantize`), built with INT8 and FP16 kernels allowed: TensorRT's explicit
  quantisation, so the calibration is the one measured on the CPU, not a second one.

Engines are specific to a GPU model and TensorRT version: build them where they run (the
container's entrypoint does, when the plans are missing). Without an NVIDIA GPU and the
TensorRT Python package this stops with a message saying so.
"""

from __future__ import annotations

import json
from pathlib import Path

from export.spec import MANIFEST, parse_pbtxt  # light imports only: this runs in the serving container

WORKSPACE_GB = 4


class TensorRTUnavailable(RuntimeError):
    """No TensorRT or no GPU here: engines cannot be built on this machine."""


def batch_profile(dims: list[int], max_batch: int) -> tuple[list[int], list[int], list[int]]:
    """(min, opt, max) shapes of one input whose first axis is the batch and the rest fixed."""
    rest = [int(d) for d in dims[1:]]
    if any(d < 1 for d in rest):
        raise ValueError(f"only the batch axis may be dynamic; input dims are {dims}")
    if max_batch < 1:
        raise ValueError(f"max_batch_size must be at least 1 for a dynamic batch profile, got {max_batch}")
    return [1, *rest], [max(1, max_batch // 2), *rest], [max_batch, *rest]


def builder_flags(precision: str) -> list[str]:
    """The TensorRT BuilderFlag names a manifest precision asks for."""
    return {"fp32": [], "fp16": ["FP16"], "int8": ["INT8", "FP16"]}[precision]


def _tensorrt():
    try:
        import tensorrt as trt  # noqa: PLC0415 - only on a GPU machine
    except ImportError:
        raise TensorRTUnavailable(
            "TensorRT's Python package is not installed (pip install tensorrt-cu12, or use the NGC "
            "tritonserver container via docker/Dockerfile); engines are built on the GPU that serves them"
        ) from None
    logger = trt.Logger(trt.Logger.WARNING)
    try:
        builder = trt.Builder(logger)
    except Exception as e:  # TensorRT raises when CUDA finds no device
        raise TensorRTUnavailable(
            f"no usable NVIDIA GPU for TensorRT here ({e}); build the engines on the serving GPU"
        ) from None
    if builder is None:
        raise TensorRTUnavailable("no usable NVIDIA GPU for TensorRT here; build the engines on the serving GPU")
    return trt, logger, builder


def build_engine(
    onnx_path: Path, plan_path: Path, max_batch: int, precision: str, workspace_gb: float = WORKSPACE_GB
) -> Path:
    trt, logger, builder = _tensorrt()
    network = builder.create_network(0)  # explicit batch (TensorRT 10's only mode)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * 2**30))
    for flag in builder_flags(precision):
        config.set_flag(getattr(trt.BuilderFlag, flag))
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        profile.set_shape(tensor.name, *batch_profile(list(tensor.shape), max_batch))
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see its log above)")
    plan_path.write_bytes(bytes(plan))
    return plan_path


def build_repository_engines(
    repository: str | Path, workspace_gb: float = WORKSPACE_GB, force: bool = False, progress=print
) -> list[Path]:
    """Build `model.plan` for every `tensorrt_plan` model of a repository that lacks one (all with force)."""
    repository = Path(repository)
    manifest_path = repository / MANIFEST
    if not manifest_path.exists():
        raise FileNotFoundError(
            f"{repository} is not a model repository (no {MANIFEST}); write one with "
            "'python -m export repository --runtime tensorrt'"
        )
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("runtime") != "tensorrt":
        raise ValueError(
            f"{repository} was written for the {manifest.get('runtime')} runtime; write it with --runtime tensorrt"
        )
    precision = manifest.get("precision", "fp32")
    built = []
    for config_path in sorted(repository.glob("*/config.pbtxt")):
        config = parse_pbtxt(config_path.read_text())
        if config.platform != "tensorrt_plan":
            continue
        # every release of the network (export.release): each version folder that holds its ONNX graph
        for version in sorted(
            (p for p in config_path.parent.iterdir() if p.name.isdigit() and (p / "model.onnx").exists()),
            key=lambda p: int(p.name),
        ):
            plan = version / (config.default_model_filename or "model.plan")
            if plan.exists() and not force:
                progress(f"{config.name}: {plan} exists (--force rebuilds it)")
                continue
            progress(
                f"{config.name} {version.name}: building a {precision} engine, batch 1..{config.max_batch_size} ..."
            )
            built.append(build_engine(version / "model.onnx", plan, config.max_batch_size, precision, workspace_gb))
    if built:
        manifest.pop("todo", None)
        manifest["engines"] = [str(p.relative_to(repository)) for p in built]
        manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")
    return built
