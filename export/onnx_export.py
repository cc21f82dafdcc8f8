"""Checkpoint -> ONNX (opset 17, dynamic batch axis), parity-checked against PyTorch.

Each model is written as `<name>.onnx` with the checkpoint's serving facts (class names,
input size, normalisation, temperature, score definition, thresholds) both in the ONNX
metadata and in `<name>.json` beside it, so nothing downstream reads the checkpoint again.
"""

from __future__ import annotations

import copy
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from core import interface as api
from core.facts import CONFIG_KEY, ServingFacts
from export.graphs import inference_graph
from training.checkpoint import load_checkpoint

OPSET = 17
PARITY_ATOL = 1e-4
PARITY_RTOL = 1e-4
PARITY_BATCHES = (1, 5)
# The tensor names inside the graphs are the ensemble's, so the repository maps them 1:1.
IO = {
    "ct_classifier": {
        "name": api.CT_CLASSIFIER,
        "inputs": (api.CT_TENSOR, api.CT_META),
        "outputs": (api.CT_PROBS, api.CT_CAM, api.CT_OOD),
    },
    "rgb_autoencoder": {
        "name": api.RGB_AUTOENCODER,
        "inputs": (api.RGB_TENSOR,),
        "outputs": (api.RGB_SCORE, api.RGB_ERROR_MAP, api.RGB_OOD),
    },
}


@dataclass(frozen=True)
class Exported:
    kind: str
    name: str
    onnx_path: Path
    facts: ServingFacts  # also in <name>.json
    parity: dict  # batch size -> max abs difference per output


def example_inputs(info: dict, batch: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Inputs of the right shape and range: normalised noise, valid metadata."""
    g = torch.Generator().manual_seed(seed)
    size, chans = int(info["input_size"]), int(info.get("in_chans", 1 if info["kind"] == "ct_classifier" else 3))
    if info["kind"] == "ct_classifier":
        image = torch.randn(batch, chans, size, size, generator=g)
        meta = torch.stack(
            [torch.randint(0, 2, (batch,), generator=g), torch.randint(0, 3, (batch,), generator=g)], 1
        ).float()
        return image, meta
    return (torch.rand(batch, chans, size, size, generator=g),)


def _export(graph: torch.nn.Module, inputs: tuple, path: Path, names: dict) -> None:
    dynamic = {n: {0: "batch"} for n in (*names["inputs"], *names["outputs"])}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about shape-derived Python ints: sizes are fixed per model
        torch.onnx.export(
            graph,
            inputs,
            str(path),
            input_names=list(names["inputs"]),
            output_names=list(names["outputs"]),
            dynamic_axes=dynamic,
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )


def check_parity(
    graph: torch.nn.Module,
    path: Path,
    info: dict,
    batches=PARITY_BATCHES,
    atol: float = PARITY_ATOL,
    rtol: float = PARITY_RTOL,
) -> dict:
    """Max |ONNX Runtime - PyTorch| per output for each batch size; raises where the file does not compute
    what the graph does.

    The file passes where every element is within atol + rtol * |PyTorch's value| (numpy's allclose).
    Where it is not, both are compared with the graph in float64: the file passes if, per output, it is
    no further from float64 than twice PyTorch's own float32 distance from it, plus atol. Some networks
    (EfficientNet) are ill-conditioned on the noise these inputs are, and float32 PyTorch is then itself
    1e-4 off; a file that computes another function is off by orders of magnitude more."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    report = {}
    exact = None
    for batch in batches:
        inputs = example_inputs(info, batch, seed=batch)
        with torch.no_grad():
            expected = [t.numpy() for t in graph(*inputs)]
        got = session.run(None, {n: t.numpy() for n, t in zip(names, inputs)})
        diffs = {o.name: float(np.abs(g - e).max()) for o, g, e in zip(session.get_outputs(), got, expected)}
        report[batch] = diffs
        if all(np.allclose(g, e, rtol=rtol, atol=atol) for g, e in zip(got, expected)):
            continue
        if exact is None:
            exact = copy.deepcopy(graph).double()
        with torch.no_grad():
            reference = [t.numpy() for t in exact(*(t.double() for t in inputs))]
        for o, g, e, r in zip(session.get_outputs(), got, expected, reference):
            ours, torch32 = float(np.abs(g - r).max()), float(np.abs(e - r).max())
            if ours > 2 * torch32 + atol:
                raise AssertionError(
                    f"{path.name}: ONNX Runtime differs from PyTorch by up to {max(diffs.values()):.2e} at batch "
                    f"{batch} ({diffs}); {o.name} is {ours:.2e} from the float64 graph, PyTorch float32 "
                    f"{torch32:.2e}"
                )
    return report


def ood_summary(gate: dict | None) -> dict | None:
    """What serving reports about a checkpoint's out-of-distribution gate (not its matrices); None: no gate."""
    if not gate:
        return None
    keys = ("threshold", "quantile", "margin", "validation", "fitted_on", "calibration")
    return {k: gate[k] for k in keys if k in gate}


def export_run(run: str | Path, out: str | Path, check: bool = True) -> Exported:
    """Export one training run (a CT or RGB checkpoint) into `out`."""
    model, info = load_checkpoint(run)
    names = IO[info["kind"]]
    facts = ServingFacts.from_dict(  # takes what serving needs; training history stays in the run
        info
        | {
            "ood_gate": ood_summary(info.get("ood")),
            "source_run": str(Path(run)),
            "inputs": names["inputs"],
            "outputs": names["outputs"],
        }
    )
    graph = inference_graph(model, info)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{names['name']}.onnx"
    _export(graph, example_inputs(info, 2), path, names)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    for key, value in ((CONFIG_KEY, facts.to_json()), ("producer", "battery-inspection export")):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))
    parity = check_parity(graph, path, info) if check else {}
    (out / f"{names['name']}.json").write_text(json.dumps(facts.to_dict(), indent=1) + "\n")
    return Exported(info["kind"], names["name"], path, facts, parity)


def read_facts(onnx_path: str | Path) -> ServingFacts:
    """The serving facts stored in an exported model."""
    proto = onnx.load(str(onnx_path), load_external_data=False)
    for entry in proto.metadata_props:
        if entry.key == CONFIG_KEY:
            return ServingFacts.from_json(entry.value)
    raise ValueError(f"{onnx_path} was not exported by this project (no serving_info metadata)")
