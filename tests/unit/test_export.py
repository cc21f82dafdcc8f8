"""Export: ONNX parity, in-graph Grad-CAM against pytorch-grad-cam, typed configs, the repository generator."""

from __future__ import annotations

import argparse
import itertools
import json
import re
import shutil
import shutil as sh
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from pytorch_grad_cam import GradCAM
from torch import nn

from client.explain.gradcam import WithMeta, target_layer
from core import interface as api
from core.facts import CONFIG_KEY, ServingFacts
from core.labels import CT_CLASSES
from export.__main__ import main
from export.graphs import CTInference, inference_graph
from export.onnx_export import OPSET, check_parity, example_inputs, export_run, read_facts
from export.options import Tuning
from export.quantize import calibration_tensors
from export.repository import build_repository, is_current
from export.spec import Batching, EnsembleSpec, ModelSpec, Step, Tensor, parse_pbtxt, to_config, to_pbtxt
from export.tensorrt import _tensorrt, batch_profile, build_repository_engines, builder_flags
from tests.support.tiny_models import make_ct_run, make_rgb_run
from training.checkpoint import load_checkpoint
from training.models import create_model
from training.synth.plan import SynthConfig
from training.synth.writer import generate


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return {
        "ct": make_ct_run(root / "ct", size=64, gate=True),
        "rgb": make_rgb_run(root / "rgb", size=64, threshold=0.3, gate=True),
        "ct_avg": make_ct_run(root / "ct_avg", size=64, pool="avg", seed=1),
        "ct_early": make_ct_run(root / "ct_early", size=64, arch="resnet18_early_fusion", seed=2),
        "ct_drn": make_ct_run(root / "ct_drn", size=64, arch="drn_aspp", seed=4, aspp_channels=64),
        "rgb_recon": make_rgb_run(root / "rgb_recon", size=64, segment=0, threshold=0.01),
    }


@pytest.mark.parametrize("name", ["ct", "ct_avg", "ct_early", "ct_drn", "rgb", "rgb_recon"])
def test_onnx_matches_pytorch_on_batches_of_1_and_5_with_a_dynamic_batch_axis(runs, tmp_path, name):
    exported = export_run(runs[name], tmp_path)
    proto = onnx.load(str(exported.onnx_path))
    assert OPSET >= 17 and {o.domain: o.version for o in proto.opset_import}[""] == OPSET
    for tensor in [*proto.graph.input, *proto.graph.output]:
        assert tensor.type.tensor_type.shape.dim[0].dim_param == "batch", tensor.name
    assert set(exported.parity) == {1, 5}
    assert max(v for d in exported.parity.values() for v in d.values()) <= 1e-4
    # the check itself: another batch size, compared independently of export_run
    session = ort.InferenceSession(str(exported.onnx_path))
    model, info = load_checkpoint(runs[name])
    graph = inference_graph(model, info)
    inputs = example_inputs(info, 3, seed=7)
    got = session.run(None, {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs)})
    with torch.no_grad():
        expected = graph(*inputs)
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e.numpy(), atol=1e-4)


def test_ct_graph_outputs_calibrated_probabilities_and_a_cam_per_image(runs, tmp_path):
    exported = export_run(runs["ct"], tmp_path)
    assert exported.facts.class_names == CT_CLASSES
    model, info = load_checkpoint(runs["ct"])
    image, meta = example_inputs(info, 4)
    probs, cam, _ = ort.InferenceSession(str(exported.onnx_path)).run(
        None, {api.CT_TENSOR: image.numpy(), api.CT_META: meta.numpy()}
    )
    with torch.no_grad():
        logits = model(image, meta)
    np.testing.assert_allclose(probs, torch.softmax(logits / info["temperature"], 1).numpy(), atol=1e-5)
    assert cam.shape == (4, 64, 64)
    assert cam.min() >= 0 and cam.max() <= 1 + 1e-6
    peaks = cam.reshape(4, -1).max(1)  # each map scaled to 0..1; all zero when no region raises the top class
    assert np.all((np.abs(peaks - 1) < 1e-3) | (peaks == 0)), peaks
    assert read_facts(exported.onnx_path).temperature == info["temperature"]


@pytest.mark.parametrize("name", ["ct", "ct_avg", "ct_early", "ct_drn"])
def test_in_graph_cam_matches_pytorch_grad_cam_per_image(runs, tmp_path, name):
    model, info = load_checkpoint(runs[name])
    image, meta = example_inputs(info, 6, seed=11)
    exported = export_run(runs[name], tmp_path)
    _, cam, _ = ort.InferenceSession(str(exported.onnx_path)).run(
        None, {api.CT_TENSOR: image.numpy(), api.CT_META: meta.numpy()}
    )
    reference = GradCAM(model=WithMeta(model, meta), target_layers=[target_layer(model)])(
        input_tensor=image, targets=None
    )
    compared = 0
    for ours, theirs in zip(cam, reference):
        if theirs.max() == 0:  # no positive evidence anywhere: both maps are empty
            assert ours.max() < 1e-6
            continue
        r = np.corrcoef(ours.ravel(), theirs.ravel())[0, 1]
        assert r >= 0.99, r
        compared += 1
    assert compared >= 3  # most images do have a map to compare


def test_cam_needs_the_fusion_head_shape():

    model = create_model("resnet18_late_fusion", hidden=16)
    model.head = nn.Sequential(nn.Linear(514, 5))
    with pytest.raises(ValueError, match="fusion head"):
        CTInference(model)


def test_parity_check_raises_when_the_onnx_file_differs(runs, tmp_path):
    exported = export_run(runs["ct"], tmp_path)
    model, info = load_checkpoint(runs["ct_avg"])  # another network against this file
    with pytest.raises(AssertionError, match="differs from PyTorch"):
        check_parity(CTInference(model, info["temperature"]), exported.onnx_path, info)


def test_config_specs_round_trip_through_the_protobuf_message():
    spec = ModelSpec(
        "m",
        (Tensor("A", "BYTES", (1,)), Tensor("B", "FP32", (2,), optional=True)),
        (Tensor("C", "INT32", (1,)),),
        batching=Batching(8, max_queue_delay_us=500),
        instances=2,
        parameters={"k": "v"},
    )
    cfg = parse_pbtxt(to_pbtxt(spec))
    assert cfg == to_config(spec)
    assert cfg.max_batch_size == 8 and cfg.dynamic_batching.max_queue_delay_microseconds == 500
    assert cfg.input[1].optional and cfg.instance_group[0].count == 2 and cfg.parameters["k"].string_value == "v"


def test_no_warmup_leaves_the_warmup_out_and_a_bytes_input_cannot_be_warmed_on_zeros(runs, tmp_path):

    assert (
        main(
            [
                "repository",
                "--runs",
                str(runs["ct"]),
                str(runs["rgb"]),
                "--out",
                str(tmp_path / "r"),
                "--no-warmup",
                "--max-batch-size",
                "4",
            ]
        )
        == 0
    )
    cfg = parse_pbtxt((tmp_path / "r" / api.RGB_AUTOENCODER / "config.pbtxt").read_text())
    assert cfg.max_batch_size == 4 and not cfg.model_warmup
    with pytest.raises(ValueError, match="cannot warm up on zeros with input A"):
        to_config(ModelSpec("m", (Tensor("A", "BYTES", (1,)),), (Tensor("C", "INT32", (1,)),), warmup=(2, 1)))


def test_config_mistakes_fail_when_the_config_is_built():
    with pytest.raises(ValueError, match="dtype"):
        Tensor("A", "FLOAT", (1,))
    with pytest.raises(ValueError, match="dims"):
        Tensor("A", "FP32", ())
    a, b = Tensor("A", "FP32", (1,)), Tensor("B", "FP32", (1,))
    with pytest.raises(ValueError, match="before any step produces it"):
        to_config(EnsembleSpec("e", (a,), (b,), (Step("m", {"X": "Z"}, {"Y": "B"}),)))
    with pytest.raises(ValueError, match="produced by no step"):
        to_config(EnsembleSpec("e", (a,), (b,), (Step("m", {"X": "A"}, {"Y": "C"}),)))
    with pytest.raises(ValueError, match="backend"):
        to_config(ModelSpec("m", (a,), (b,), backend="torch"))


@pytest.fixture(scope="module")
def repository(runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("repo") / "model_repository"
    manifest = build_repository([runs["ct"], runs["rgb"]], "python-ort", out, progress=lambda *_: None)
    return out, manifest


def test_repository_has_every_model_with_facts_from_the_checkpoints(repository, runs):
    out, manifest = repository
    names = {
        api.PREPROCESS,
        api.CT_PREPROCESS,
        api.CT_CLASSIFIER,
        api.RGB_PREPROCESS,
        api.RGB_AUTOENCODER,
        api.VERDICT_MODEL,
        api.INSPECT,
        api.INSPECT_CT,
        api.INSPECT_RGB,
    }
    assert set(manifest["models"]) == names
    configs = {n: parse_pbtxt((out / n / "config.pbtxt").read_text()) for n in names}
    for name, cfg in configs.items():
        assert cfg.name == name and cfg.max_batch_size >= 8
        if cfg.platform != "ensemble":
            assert cfg.HasField("dynamic_batching")
    inspect = configs[api.INSPECT]
    assert [i.name for i in inspect.input] == [api.CT_IMAGE, api.CT_META, api.RGB_IMAGE]
    assert [o.name for o in inspect.output] == list(api.INSPECT_OUTPUTS)
    assert [o.name for o in configs[api.INSPECT_CT].output] == list(api.INSPECT_CT_OUTPUTS)
    assert [o.name for o in configs[api.INSPECT_RGB].output] == list(api.INSPECT_RGB_OUTPUTS)
    cam = next(o for o in inspect.output if o.name == api.CT_CAM)
    assert list(cam.dims) == [64, 64]  # the checkpoint's input size
    # release 1: what is the release's own is a parameter `name@1`, each model loads version 1 and
    # every ensemble step runs it; the verdict model's release@1 is what MODEL_VERSIONS answers
    params = {n: {k: v.string_value for k, v in c.parameters.items()} for n, c in configs.items()}
    rule = json.loads(params[api.VERDICT_MODEL]["rule@1"])
    assert rule["rgb_threshold"] == pytest.approx(0.3)  # from the RGB checkpoint
    assert json.loads(params[api.VERDICT_MODEL]["release@1"]) == {
        "release": 1,
        "ct_classifier": manifest["runs"]["ct_classifier"]["checkpoint_sha256"][:12],
        "rgb_autoencoder": manifest["runs"]["rgb_autoencoder"]["checkpoint_sha256"][:12],
    }
    for name, cfg in configs.items():
        if cfg.platform == "ensemble":
            assert {s.model_version for s in cfg.ensemble_scheduling.step} == {1}, name
        else:
            assert list(cfg.version_policy.specific.versions) == [1], name
    assert manifest["serving"] == 1 and set(manifest["releases"]) == {"1"} and manifest["staged"] is None
    info = json.loads(api.release_view(params[api.CT_PREPROCESS], 1)["serving_info"])
    assert info["input_size"] == 64 and info["normalization"] == load_checkpoint(runs["ct"])[1]["normalization"]
    assert (out / api.CT_CLASSIFIER / "1" / "model.onnx").exists() and (
        out / api.CT_CLASSIFIER / "1" / "model.py"
    ).exists()
    for name, cfg in configs.items():  # the networks, and only they, run every batch size on zeros at load
        if name in (api.CT_CLASSIFIER, api.RGB_AUTOENCODER):
            assert [w.batch_size for w in cfg.model_warmup] == list(range(cfg.max_batch_size, 0, -1))
            for w in cfg.model_warmup:
                assert set(w.inputs) == {i.name for i in cfg.input}
                assert all(
                    w.inputs[i.name].zero_data and list(w.inputs[i.name].dims) == list(i.dims) for i in cfg.input
                )
        else:
            assert not cfg.model_warmup, name
    assert is_current(out, [runs["ct"], runs["rgb"]], "python-ort")
    assert not is_current(out, [runs["ct_avg"], runs["rgb"]], "python-ort")
    assert not is_current(out, [runs["ct"], runs["rgb"]], "onnxruntime")


@pytest.mark.parametrize("runtime", ["onnxruntime", "tensorrt"])
def test_native_runtimes_get_native_backend_configs_and_the_same_other_models(repository, runs, tmp_path, runtime):
    out, _ = repository
    native_out = tmp_path / "build" / runtime  # its parent does not exist yet, as in a fresh clone
    build_repository([runs["ct"], runs["rgb"]], runtime, native_out, progress=lambda *_: None)
    for name in (api.CT_CLASSIFIER, api.RGB_AUTOENCODER):
        native = parse_pbtxt((native_out / name / "config.pbtxt").read_text())
        python = parse_pbtxt((out / name / "config.pbtxt").read_text())
        assert native.platform == {"onnxruntime": "onnxruntime_onnx", "tensorrt": "tensorrt_plan"}[runtime]
        assert native.default_model_filename == {"onnxruntime": "model.onnx", "tensorrt": "model.plan"}[runtime]
        assert native.instance_group[0].kind == native.instance_group[0].KIND_GPU
        assert native.max_batch_size == python.max_batch_size and native.HasField("dynamic_batching")
        assert list(native.input) == list(python.input) and list(native.output) == list(python.output)
        assert list(native.model_warmup) == list(python.model_warmup) and native.model_warmup
        assert not (native_out / name / "1" / "model.py").exists()
        assert (native_out / name / "1" / "model.onnx").exists()  # what the engine is built from, for tensorrt
    for name in (
        api.PREPROCESS,
        api.CT_PREPROCESS,
        api.RGB_PREPROCESS,
        api.VERDICT_MODEL,
        api.INSPECT,
        api.INSPECT_CT,
        api.INSPECT_RGB,
    ):
        assert (native_out / name / "config.pbtxt").read_text() == (out / name / "config.pbtxt").read_text(), name


def test_repository_cli_writes_a_tensorrt_repository_and_says_what_is_missing(runs, tmp_path, capsys):

    assert (
        main(
            [
                "repository",
                "--runs",
                str(runs["ct"]),
                str(runs["rgb"]),
                "--runtime",
                "tensorrt",
                "--out",
                str(tmp_path / "r"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "TensorRT engines" in out
    cfg = parse_pbtxt((tmp_path / "r" / api.RGB_AUTOENCODER / "config.pbtxt").read_text())
    assert cfg.platform == "tensorrt_plan"
    assert not (tmp_path / "r" / api.RGB_AUTOENCODER / "1" / "model.py").exists()


def test_fit_cores_sets_preprocessing_instances_and_network_threads_for_the_cores_given(repository, tmp_path, capsys):

    repo = tmp_path / "r"
    sh.copytree(repository[0], repo)
    assert main(["fit-cores", str(repo), "--cores", "3"]) == 0
    assert "fitted to 3 core(s)" in capsys.readouterr().out
    for name in (api.PREPROCESS, api.CT_PREPROCESS, api.RGB_PREPROCESS):
        assert [g.count for g in parse_pbtxt((repo / name / "config.pbtxt").read_text()).instance_group] == [3]
    for name in (api.CT_CLASSIFIER, api.RGB_AUTOENCODER):
        cfg = parse_pbtxt((repo / name / "config.pbtxt").read_text())
        assert cfg.parameters["intra_op_threads"].string_value == "3" and [g.count for g in cfg.instance_group] == [1]
    assert main(["fit-cores", str(repo), "--cores", "16"]) == 0  # at most 4 preprocessing processes
    assert parse_pbtxt((repo / api.PREPROCESS / "config.pbtxt").read_text()).instance_group[0].count == 4
    assert main(["fit-cores", str(tmp_path)]) == 2  # not a repository: a clear error
    assert "not a built repository" in capsys.readouterr().err


def _gpu_for_tensorrt() -> str | None:
    """Why TensorRT engines cannot be built here, or None where they can."""
    try:
        _tensorrt()
    except Exception as e:
        return str(e)
    return None


NO_TENSORRT = _gpu_for_tensorrt()


def test_tensorrt_profiles_cover_the_batch_axis_and_precisions_map_to_builder_flags():

    assert batch_profile([-1, 1, 96, 96], 16) == ([1, 1, 96, 96], [8, 1, 96, 96], [16, 1, 96, 96])
    assert batch_profile([-1, 2], 1) == ([1, 2], [1, 2], [1, 2])
    with pytest.raises(ValueError, match="only the batch axis"):
        batch_profile([-1, 3, -1, -1], 8)
    assert (
        builder_flags("fp32") == [] and builder_flags("fp16") == ["FP16"] and builder_flags("int8") == ["INT8", "FP16"]
    )


@pytest.mark.skipif(NO_TENSORRT is None, reason="TensorRT and a GPU are present: the engine test below applies")
def test_tensorrt_command_without_a_gpu_stops_with_a_clear_message(runs, tmp_path, capsys):

    repo = tmp_path / "trt"
    build_repository([runs["ct"], runs["rgb"]], "tensorrt", repo, progress=lambda *_: None)
    assert main(["tensorrt", str(repo)]) == 2
    err = capsys.readouterr().err
    assert "cannot build TensorRT engines here" in err and ("GPU" in err or "TensorRT" in err)
    assert not list(repo.glob("*/1/model.plan"))
    assert main(["tensorrt", str(tmp_path)]) == 2  # not a repository: says so
    assert "not a model repository" in capsys.readouterr().err


@pytest.mark.skipif(NO_TENSORRT is not None, reason=f"needs TensorRT and an NVIDIA GPU: {NO_TENSORRT}")
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_tensorrt_engines_answer_like_onnx_runtime(runs, tmp_path, precision):
    import tensorrt as trt  # noqa: PLC0415 - only on a GPU machine

    data = tmp_path / "cells"
    generate(
        data,
        SynthConfig(
            batteries=2, seed=8, ct_size=96, rgb_width=160, rgb_height=90, slices_per_axis=2, photos_per_battery=2
        ),
        workers=1,
        progress=False,
    )
    repo = tmp_path / "trt"
    tuning = Tuning(precision=precision, calibration=str(data))
    build_repository([runs["ct"], runs["rgb"]], "tensorrt", repo, tuning=tuning, progress=lambda *_: None)
    built = build_repository_engines(repo, workspace_gb=1)
    assert sorted(p.parent.parent.name for p in built) == [api.CT_CLASSIFIER, api.RGB_AUTOENCODER]
    ct_facts, rgb_facts = (
        ServingFacts.from_json(
            api.release_view(
                {k: v.string_value for k, v in parse_pbtxt((repo / m / "config.pbtxt").read_text()).parameters.items()},
                1,
            )[CONFIG_KEY]
        )
        for m in (api.CT_PREPROCESS, api.RGB_PREPROCESS)
    )
    feeds = calibration_tensors(data, ct_facts, rgb_facts, n=5)  # batch 5: inside the profile, not at its optimum
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    for name, inputs in ((api.CT_CLASSIFIER, (api.CT_TENSOR, api.CT_META)), (api.RGB_AUTOENCODER, (api.RGB_TENSOR,))):
        engine = runtime.deserialize_cuda_engine((repo / name / "1" / "model.plan").read_bytes())
        context = engine.create_execution_context()
        buffers = {}
        for n in inputs:
            buffers[n] = torch.from_numpy(feeds[n]).cuda().contiguous()
            context.set_input_shape(n, tuple(buffers[n].shape))
        outputs = [
            engine.get_tensor_name(i) for i in range(engine.num_io_tensors) if engine.get_tensor_name(i) not in inputs
        ]
        for n in outputs:
            buffers[n] = torch.empty(tuple(context.get_tensor_shape(n)), dtype=torch.float32, device="cuda")
        for n, b in buffers.items():
            context.set_tensor_address(n, b.data_ptr())
        assert context.execute_async_v3(torch.cuda.current_stream().cuda_stream)
        torch.cuda.synchronize()
        reference = ort.InferenceSession(str(repo / name / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
        expected = dict(
            zip([o.name for o in reference.get_outputs()], reference.run(None, {n: feeds[n] for n in inputs}))
        )
        for n in outputs:
            # against the same ONNX file in ONNX Runtime (for int8: the same calibrated QDQ graph)
            atol = {"fp32": 2e-3, "fp16": 2e-2, "int8": 5e-2}[precision]
            np.testing.assert_allclose(buffers[n].cpu().numpy(), expected[n], atol=atol, err_msg=n)


def test_a_rebuild_replaces_the_models_and_keeps_the_folders_readme(runs, tmp_path):
    out = tmp_path / "model_repository"
    out.mkdir()
    (out / "README.md").write_text("what this folder is")
    (out / "stale_model").mkdir()
    build_repository([runs["ct"], runs["rgb"]], "python-ort", out, progress=lambda *_: None)
    assert (out / "README.md").read_text() == "what this folder is"
    assert not (out / "stale_model").exists() and (out / api.INSPECT / "config.pbtxt").exists()


def _on_avx2_only(model, feeds: dict, folder) -> np.ndarray | None:
    """The model's first output on an emulated CPU with AVX2 but neither AVX-512 nor VNNI
    (qemu-user's Haswell; make setup installs it as root), or None where qemu-x86_64 is missing."""
    if not shutil.which("qemu-x86_64"):
        return None
    np.savez(folder / "feeds.npz", **feeds)
    script = (
        "import sys, numpy as np, onnxruntime as ort; f = dict(np.load(sys.argv[2]));"
        "np.save(sys.argv[3], ort.InferenceSession(sys.argv[1]).run(None, f)[0])"
    )
    subprocess.run(
        [
            "qemu-x86_64",
            "-cpu",
            "Haswell",
            sys.executable,
            "-c",
            script,
            str(model),
            str(folder / "feeds.npz"),
            str(folder / "avx2.npy"),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return np.load(folder / "avx2.npy")


def _int8_cannot_saturate(path) -> None:
    """Every quantised convolution either has int8 weights in 7 bits or uint8 weights (U8U8):
    ONNX Runtime's 16-bit pair sums on CPUs without VNNI cannot saturate (export.quantize)."""

    model = onnx.load(str(path))
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    kinds = []
    for conv in convs:
        dq = producers.get(conv.input[1])
        assert dq is not None and dq.op_type == "DequantizeLinear", f"{conv.name}: weights not quantised"
        w = weights[dq.input[0]]
        kinds.append(w.dtype)
        assert w.dtype == np.uint8 or (w.dtype == np.int8 and np.abs(w.astype(int)).max() <= 64), (
            f"{conv.name}: {w.dtype} {w.min()}..{w.max()}"
        )
    assert kinds[0] == np.uint8 and all(k == np.int8 for k in kinds[1:])  # U8U8 only for the first (cheap) convolution


# float32 rounding of the same integer results through different instruction sets (softmax, dequantisation)
FLOAT32_SLACK = 1e-4


def test_int8_and_fp16_repositories_keep_the_interface_and_the_decisions(runs, tmp_path):

    data = tmp_path / "calibration"
    generate(
        data,
        SynthConfig(
            batteries=3, seed=8, ct_size=96, rgb_width=160, rgb_height=90, slices_per_axis=2, photos_per_battery=2
        ),
        workers=1,
        progress=False,
    )
    fp32, int8 = tmp_path / "fp32", tmp_path / "int8"
    tuning = Tuning(precision="int8", calibration=str(data))
    build_repository([runs["ct"], runs["rgb"]], "python-ort", fp32, progress=lambda *_: None)
    said = []
    manifest = build_repository([runs["ct"], runs["rgb"]], "python-ort", int8, tuning=tuning, progress=said.append)
    assert manifest["precision"] == "int8" and any("INT8" in line for line in said)
    assert is_current(int8, [runs["ct"], runs["rgb"]], "python-ort", tuning=tuning)
    assert not is_current(int8, [runs["ct"], runs["rgb"]], "python-ort")  # an FP32 build is another build
    for name in (api.CT_CLASSIFIER, api.RGB_AUTOENCODER):
        ops = {n.op_type for n in onnx.load(str(int8 / name / "1" / "model.onnx")).graph.node}
        assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
        assert "QuantizeLinear" not in {n.op_type for n in onnx.load(str(fp32 / name / "1" / "model.onnx")).graph.node}

    feeds = calibration_tensors(
        data, ServingFacts.from_dict(load_checkpoint(runs["ct"])[1]), None
    )  # real slices, as the server prepares them
    p32, cam32, _ = ort.InferenceSession(str(fp32 / api.CT_CLASSIFIER / "1" / "model.onnx")).run(None, feeds)
    int8_ct = int8 / api.CT_CLASSIFIER / "1" / "model.onnx"
    p8, cam8, _ = ort.InferenceSession(str(int8_ct)).run(None, feeds)
    # How far INT8 may lie from FP32 is what the quantisation steps explain, not a fixed number
    # (a tiny random model's quantisation error moves with its calibration ranges). The float
    # reference of the quantised graph (QuantizeLinear/DequantizeLinear as ONNX defines them, no
    # fused integer kernels) rounds every quantised tensor to the nearest step: its distance from
    # FP32, `step_error`, is the quantisation's own effect, computed in float32 on any CPU. The
    # integer kernels requantise the same tensors and may land one step off where the reference
    # lands half a step off: at most twice that effect again.
    plain = ort.SessionOptions()
    plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    p8_reference = ort.InferenceSession(str(int8_ct), plain).run(None, feeds)[0]
    step_error = float(np.abs(p8_reference - p32).max())
    assert 0 < step_error < 0.1  # quantised (not a copy of FP32), and not broken
    assert np.abs(p8 - p32).max() <= 3 * step_error + FLOAT32_SLACK
    assert np.mean(p8.argmax(1) == p32.argmax(1)) >= 0.9  # the decisions on real slices
    assert cam8.shape == cam32.shape
    _int8_cannot_saturate(int8_ct)
    _int8_cannot_saturate(int8 / api.RGB_AUTOENCODER / "1" / "model.onnx")
    # The same INT8 model on a CPU without VNNI or AMX (AVX2 only, emulated): integer arithmetic
    # that cannot saturate (above) is exact, so the answers are the same whichever kernels ran here
    p8_avx2 = _on_avx2_only(int8_ct, feeds, tmp_path)
    if p8_avx2 is not None:
        assert np.abs(p8_avx2 - p8).max() < FLOAT32_SLACK
    with pytest.raises(ValueError, match="precision must be one of fp32, fp16, int8"):
        Tuning(precision="bf16")
    half = tmp_path / "fp16"
    build_repository(
        [runs["ct"], runs["rgb"]],
        "python-ort",
        half,
        tuning=Tuning(precision="fp16", calibration=str(data)),
        progress=lambda *_: None,
    )
    model = onnx.load(str(half / api.CT_CLASSIFIER / "1" / "model.onnx"))
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
    assert [i.type.tensor_type.elem_type for i in model.graph.input] == [
        onnx.TensorProto.FLOAT
    ] * 2  # the interface stays float32
    p16, *_ = ort.InferenceSession(str(half / api.CT_CLASSIFIER / "1" / "model.onnx")).run(None, feeds)
    assert np.abs(p16 - p32).max() < 5e-3
    p16_avx2 = _on_avx2_only(half / api.CT_CLASSIFIER / "1" / "model.onnx", feeds, tmp_path)
    if p16_avx2 is not None:
        assert np.abs(p16_avx2 - p32).max() < 5e-3


def test_repository_refuses_runs_without_both_models(runs, tmp_path, capsys):

    assert main(["repository", "--runs", str(runs["ct"]), "--out", str(tmp_path / "r")]) == 2
    assert "no rgb_autoencoder checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_the_container_pins_the_same_versions_as_the_project():
    # the container's Python-backend models decode images with these packages; another Pillow or pydicom
    # could give served cells other pixels than training saw. torch comes from PyTorch's CPU wheel index there.

    root = Path(__file__).resolve().parents[2]
    ours = {}
    for requirement in tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]:
        name, _, version = requirement.partition("==")
        ours[re.sub(r"\[.*\]", "", name).lower()] = version
    dockerfile = (root / "docker" / "Dockerfile").read_text()
    pins = {
        re.sub(r"\[.*\]", "", n).lower(): v
        for n, v in re.findall(r'"?([A-Za-z][\w.\-\[\],]*)==([\w.+]+)"?', dockerfile)
    }
    shared = {n: (v, ours[n]) for n, v in pins.items() if n in ours and n not in ("torch", "torchvision")}
    assert {"pillow", "pydicom", "numpy", "onnxruntime", "tritonclient"} <= set(shared)
    assert {n: vs for n, vs in shared.items() if vs[0] != vs[1]} == {}
    for package in (
        "pillow",
        "pydicom",
        "numpy",
        "pyyaml",
        "protobuf",
    ):  # both stages pin what decodes and reads configs
        assert len(re.findall(rf"(?i)\b{package}==", dockerfile)) == 2, package


def _pruned(config, requested: set[str]) -> set[int]:
    """The steps tritonserver 2.51 leaves out of an ensemble request that asks for `requested`:
    a port of the backward traversal in EnsembleContext's constructor (core,
    src/ensemble_scheduler/ensemble_scheduler.cc, "Prune ensemble first if not all outputs are
    requested"), including its way of counting: a step goes when as many of its outputs were
    found unneeded as it has, whether or not another step reads them."""
    steps = list(config.ensemble_scheduling.step)
    producer = {t: i for i, s in enumerate(steps) for t in s.output_map.values()}
    consumers: dict[str, set[int]] = {}
    for i, s in enumerate(steps):
        for t in s.input_map.values():
            consumers.setdefault(t, set()).add(i)
    ignored = {o.name for o in config.output} - requested
    left = {}
    pruned: set[int] = set()
    while ignored:
        new = set()
        for tensor in ignored:
            i = producer.get(tensor, 0)  # Triton's map yields step 0 for a tensor no step produces
            left.setdefault(i, len(steps[i].output_map))
            left[i] -= 1
            if left[i] == 0:
                pruned.add(i)
                for t in steps[i].input_map.values():
                    consumers[t].discard(i)
                    if not consumers[t]:
                        new.add(t)
        ignored = new
    return pruned


def _stranded(config, requested: set[str]) -> list[str]:
    """What a request for `requested` would wait for forever ("unexpected deadlock"): a requested
    output or a kept step's input that only a pruned step produces."""
    steps = list(config.ensemble_scheduling.step)
    pruned = _pruned(config, requested)
    made = {i.name for i in config.input} | {
        t for k, s in enumerate(steps) if k not in pruned for t in s.output_map.values()
    }
    needed = set(requested) | {t for k, s in enumerate(steps) if k not in pruned for t in s.input_map.values()}
    return sorted(needed - made)


def test_every_subset_of_an_ensembles_outputs_keeps_the_steps_it_needs_under_tritons_pruning(repository):
    """The python-ort repository's ensembles (the native runtimes' are the same files, checked
    above) under Triton's pruning, for every subset of outputs: nothing stranded, and `inspect`
    always runs `verdict` (so every cell is decided and counted). The old layout, where
    `verdict` read CT_PROBS that was also an ensemble output, strands most subsets."""
    out, _ = repository
    for name in (api.INSPECT, api.INSPECT_CT, api.INSPECT_RGB):
        config = parse_pbtxt((out / name / "config.pbtxt").read_text())
        outputs = [o.name for o in config.output]
        verdict = [i for i, s in enumerate(config.ensemble_scheduling.step) if s.model_name == api.VERDICT_MODEL]
        for r in range(1, len(outputs) + 1):
            for subset in itertools.combinations(outputs, r):
                assert _stranded(config, set(subset)) == [], (name, subset)
                if name == api.INSPECT:
                    assert not set(verdict) & _pruned(config, set(subset)), subset
    old = parse_pbtxt((out / api.INSPECT_RGB / "config.pbtxt").read_text())
    rgb_net, verdict_step = old.ensemble_scheduling.step[1], old.ensemble_scheduling.step[2]
    for tensor in list(rgb_net.output_map):
        rgb_net.output_map[tensor] = tensor  # the network's outputs straight to the ensemble's
    verdict_step.ClearField("output_map")
    verdict_step.output_map[api.RGB_THRESHOLD] = api.RGB_THRESHOLD
    verdict_step.ClearField("input_map")
    verdict_step.input_map.update({api.internal(api.RGB_SCORE): api.RGB_SCORE, api.internal(api.RGB_OOD): api.RGB_OOD})
    assert _stranded(old, {api.RGB_SCORE}) == [api.RGB_SCORE]  # the failure tritonserver showed


def test_serve_improves_in_the_background_only_on_a_first_start(tmp_path, monkeypatch, capsys):
    """`make serve` trains the standard preset in the background when it serves the default runs and
    runs/standard is not trained; never with runs given, when turned off, or with TLS."""
    from export.__main__ import _improvement  # noqa: PLC0415

    monkeypatch.chdir(tmp_path)

    def args(**given):
        return argparse.Namespace(**({"no_improve": False, "runs": None, "tls_cert": None} | given))

    assert _improvement(args()) is True
    assert _improvement(args(no_improve=True)) is False
    assert _improvement(args(runs=[Path("runs/mine")])) is False
    assert _improvement(args(tls_cert=Path("cert.pem"))) is False
    assert "with TLS, run python -m training.improve yourself" in capsys.readouterr().out
    for model in ("ct", "rgb"):
        (tmp_path / "runs" / "standard" / model).mkdir(parents=True)
        (tmp_path / "runs" / "standard" / model / "checkpoint.pt").write_bytes(b"")
    assert _improvement(args()) is False  # the standard preset is trained: serve it
