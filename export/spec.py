"""Typed specifications of Triton models, turned into `config.pbtxt` through Triton's own
protobuf message (`model_config_pb2.ModelConfig`), so a wrong field fails here rather than
at server start.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from core import interface as api
from serving.runtime import available_cores, preprocess_instances_for

MANIFEST = "manifest.json"  # what a built repository records about itself (export.repository writes it)
DTYPES = {
    "FP32": mc.TYPE_FP32,
    "INT32": mc.TYPE_INT32,
    "BYTES": mc.TYPE_STRING,
    "FP16": mc.TYPE_FP16,
    "INT64": mc.TYPE_INT64,
}
KINDS = {"cpu": mc.ModelInstanceGroup.KIND_CPU, "gpu": mc.ModelInstanceGroup.KIND_GPU}


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str  # a key of DTYPES
    dims: tuple[int, ...]  # per item, without the batch axis
    optional: bool = False

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"tensor {self.name}: dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if not self.dims or any(d == 0 or d < -1 for d in self.dims):
            raise ValueError(f"tensor {self.name}: dims must be positive or -1, got {self.dims}")


@dataclass(frozen=True)
class Batching:
    max_batch_size: int = 16
    preferred: tuple[int, ...] = ()
    max_queue_delay_us: int = 2000
    max_queue_size: int = 0  # requests waiting per model beyond which new ones are refused at once (0: no limit)


@dataclass(frozen=True)
class ModelSpec:
    """A model served by a backend: python, onnxruntime or tensorrt."""

    name: str
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    backend: str = "python"
    batching: Batching = Batching()
    instances: int = 1
    kind: str = "cpu"
    default_model_filename: str = ""
    parameters: dict[str, str] = field(default_factory=dict)
    accelerator: dict[str, str] | None = None  # GPU execution accelerator (e.g. TensorRT for onnxruntime)
    # Batch sizes run once each, on zeros, when the model loads (Triton's model_warmup), before
    # it is marked ready: the allocator reaches its high-water mark at load instead of at the
    # first rush hour, and the first real batch pays no first-run cost.
    warmup: tuple[int, ...] = ()
    # the versions Triton loads (version_policy specific): the releases kept ready; () is Triton's default
    versions: tuple[int, ...] = ()

    PLATFORMS = {"onnxruntime": "onnxruntime_onnx", "tensorrt": "tensorrt_plan"}


@dataclass(frozen=True)
class Step:
    model: str
    input_map: dict[str, str]  # model input -> ensemble tensor
    output_map: dict[str, str]  # model output -> ensemble tensor
    version: int = -1  # the model version (release) the step runs; -1: the latest loaded


@dataclass(frozen=True)
class EnsembleSpec:
    name: str
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    steps: tuple[Step, ...]
    max_batch_size: int = 16


def _tensors(message_list, tensors, output: bool = False) -> None:
    for t in tensors:
        m = message_list.add()
        m.name, m.data_type = t.name, DTYPES[t.dtype]
        m.dims.extend(t.dims)
        if t.optional and not output:
            m.optional = True


def to_config(spec: ModelSpec | EnsembleSpec) -> mc.ModelConfig:
    cfg = mc.ModelConfig(name=spec.name)
    if isinstance(spec, EnsembleSpec):
        cfg.platform = "ensemble"
        cfg.max_batch_size = spec.max_batch_size
        _tensors(cfg.input, spec.inputs)
        _tensors(cfg.output, spec.outputs, output=True)
        produced = {t.name for t in spec.inputs}
        for step in spec.steps:
            missing = set(step.input_map.values()) - produced
            if missing:
                raise ValueError(
                    f"ensemble {spec.name}: step {step.model} reads {sorted(missing)} before any step produces it"
                )
            s = cfg.ensemble_scheduling.step.add(model_name=step.model, model_version=step.version)
            s.input_map.update(step.input_map)
            s.output_map.update(step.output_map)
            produced |= set(step.output_map.values())
        unproduced = {t.name for t in spec.outputs} - produced
        if unproduced:
            raise ValueError(f"ensemble {spec.name}: outputs {sorted(unproduced)} are produced by no step")
        return cfg
    if spec.backend == "python":
        cfg.backend = "python"
    elif spec.backend in ModelSpec.PLATFORMS:
        cfg.platform = ModelSpec.PLATFORMS[spec.backend]
    else:
        raise ValueError(f"model {spec.name}: backend must be python, onnxruntime or tensorrt, got {spec.backend!r}")
    if spec.default_model_filename:
        cfg.default_model_filename = spec.default_model_filename
    cfg.max_batch_size = spec.batching.max_batch_size
    _tensors(cfg.input, spec.inputs)
    _tensors(cfg.output, spec.outputs, output=True)
    if spec.batching.max_batch_size > 0:
        cfg.dynamic_batching.max_queue_delay_microseconds = spec.batching.max_queue_delay_us
        cfg.dynamic_batching.preferred_batch_size.extend(spec.batching.preferred)
        if spec.batching.max_queue_size:
            cfg.dynamic_batching.default_queue_policy.max_queue_size = spec.batching.max_queue_size
    cfg.instance_group.add(count=spec.instances, kind=KINDS[spec.kind])
    if spec.versions:
        cfg.version_policy.specific.versions.extend(sorted(spec.versions))
    for key, value in spec.parameters.items():
        cfg.parameters[key].string_value = str(value)
    for size in spec.warmup:
        w = cfg.model_warmup.add(name=f"zeros_batch_{size}", batch_size=size, count=1)
        for t in spec.inputs:
            if t.dtype == "BYTES" or any(d < 0 for d in t.dims):
                raise ValueError(
                    f"model {spec.name}: cannot warm up on zeros with input {t.name} ({t.dtype}, dims {t.dims})"
                )
            w.inputs[t.name].CopyFrom(mc.ModelWarmup.Input(data_type=DTYPES[t.dtype], dims=t.dims, zero_data=True))
    if spec.accelerator:
        acc = cfg.optimization.execution_accelerators.gpu_execution_accelerator.add(name=spec.accelerator["name"])
        acc.parameters.update({k: v for k, v in spec.accelerator.items() if k != "name"})
    return cfg


def to_pbtxt(spec: ModelSpec | EnsembleSpec) -> str:
    return text_format.MessageToString(to_config(spec))


def parse_pbtxt(text: str) -> mc.ModelConfig:
    return text_format.Parse(text, mc.ModelConfig())


def fit_to_cores(repository: str | Path, cores: int | None = None) -> list[str]:
    """Set a built repository's CPU parallelism for `cores` (default: the cores this process
    may use) as `Tuning`'s defaults would: each preprocessing model gets one instance per core
    (at most 4), each python-ort network that many ONNX Runtime threads. A container built on
    one machine and started on another, or with --cpus, then serves with what it is given.
    Returns the names of the models changed."""

    cores = cores or available_cores()
    changed = []
    for config in sorted(Path(repository).glob("*/config.pbtxt")):
        cfg = parse_pbtxt(config.read_text())
        before = text_format.MessageToString(cfg)
        if cfg.name in (api.PREPROCESS, api.CT_PREPROCESS, api.RGB_PREPROCESS):
            for group in cfg.instance_group:
                group.count = preprocess_instances_for(cores)
        if "intra_op_threads" in cfg.parameters:
            cfg.parameters["intra_op_threads"].string_value = str(cores)
        after = text_format.MessageToString(cfg)
        if after != before:
            config.write_text(after)
            changed.append(cfg.name)
    return changed
