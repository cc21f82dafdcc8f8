"""Write the Triton model repository for a CT run and an RGB run, for one runtime.

    preprocess ────┐                                   ┌─ inspect     (all; preprocess, both networks, verdict)
    ct_preprocess ─┤                                   │
    ct_classifier ─┤ ── ensembles ─────────────────────┼─ inspect_ct  (CT_PROBS, CT_CAM)
    rgb_preprocess ┤                                   │
    rgb_autoencoder┤                                   └─ inspect_rgb (RGB_SCORE, RGB_THRESHOLD, RGB_ERROR_MAP)
    verdict ───────┘

`inspect` prepares both images in one first step (`preprocess`) so that a bad cell is
refused before anything else runs: an ensemble that fails in one branch while another
branch is still in flight makes tritonserver 2.51 intermittently reject concurrent good
requests (see serving/triton_models/preprocess.py).

Runtimes: `python-ort` (each ONNX model in a Python-backend model that runs ONNX Runtime;
what runs here and in CI), `onnxruntime` and `tensorrt` (native backends of the NGC
container, GPU instances). The preprocessing, verdict and ensemble models are the same in
all three. Every size, class name and threshold comes from the checkpoints.
"""

from __future__ import annotations

import compileall
import datetime as _dt
import hashlib
import json
import shutil
import tempfile
from functools import partial
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from core import interface as api
from core.facts import CONFIG_KEY, ServingFacts
from core.labels import CT_CLASSES
from core.reviewed import REVIEWED_RUN_FILE
from ensemble.rule import RULE_FILE, load_rule
from export.onnx_export import export_run
from export.options import Tuning
from export.quantize import calibration_tensors, quantize_int8, to_fp16
from export.release import (
    kept_releases,
    merged_configs,
    read_state,
    release_state,
    write_staged_ensembles,
    write_state,
)
from export.spec import MANIFEST, Batching, EnsembleSpec, ModelSpec, Step, Tensor, to_pbtxt
from serving import triton_models
from training.checkpoint import CHECKPOINT

RUNTIMES = ("python-ort", "onnxruntime", "tensorrt")
SOURCES = Path(triton_models.__file__).parent  # the Python-backend model sources


def checkpoint_digest(run: Path) -> str:
    h = hashlib.sha256()
    with open(run / CHECKPOINT, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _build_digest(rule_path, tuning: Tuning) -> str:
    """What else a repository is built from: the adapters, the rule file and the tuning."""
    h = hashlib.sha256(repr(tuning).encode())
    for path in sorted(SOURCES.glob("*.py")) + [Path(rule_path or RULE_FILE)]:
        h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()


def classify_runs(runs, required=("ct_classifier", "rgb_autoencoder")) -> dict[str, Path]:
    """{'ct_classifier': run, 'rgb_autoencoder': run} from run folders (or a preset folder holding ct/ and rgb/);
    raises when a `required` kind is missing."""

    found: dict[str, Path] = {}
    candidates = []
    for run in map(Path, runs):
        if (run / CHECKPOINT).exists():
            candidates.append(run)
        else:
            candidates += [p.parent for p in sorted(run.glob(f"*/{CHECKPOINT}"))]
    for run in candidates:
        # memory-mapped: only the kind is read, not the weights (export loads them once, later)
        kind = torch.load(run / CHECKPOINT, map_location="cpu", weights_only=False, mmap=True).get("kind")
        if kind in found:
            raise ValueError(f"two {kind} runs given: {found[kind]} and {run}")
        found[kind] = run
    missing = set(required) - set(found)
    if missing:
        raise ValueError(
            f"no {' or '.join(sorted(missing))} checkpoint among {[str(r) for r in runs]}; "
            "train one with 'python -m training.preset quick'"
        )
    return found


def _network(name: str, runtime: str, inputs, outputs, tuning: Tuning, release: int = 1) -> ModelSpec:
    batching = Batching(
        tuning.max_batch_size, max_queue_delay_us=tuning.max_queue_delay_us, max_queue_size=tuning.max_queue_size
    )
    warmup = tuple(range(tuning.max_batch_size, 0, -1)) if tuning.warmup else ()
    if runtime == "python-ort":
        return ModelSpec(
            name,
            inputs,
            outputs,
            backend="python",
            batching=batching,
            instances=tuning.network_instances,
            parameters={"onnx_file": "model.onnx", "intra_op_threads": str(tuning.intra_op_threads)},
            warmup=warmup,
            versions=(release,),
        )
    filename = "model.onnx" if runtime == "onnxruntime" else "model.plan"
    return ModelSpec(
        name,
        inputs,
        outputs,
        backend=runtime,
        batching=batching,
        instances=tuning.network_instances,
        kind="gpu",
        default_model_filename=filename,
        warmup=warmup,
        versions=(release,),
    )


def model_specs(
    ct: ServingFacts,
    rgb: ServingFacts,
    rule_json: str,
    runtime: str,
    tuning: Tuning = Tuning(),
    release: int = 1,
    release_json: str | None = None,
) -> list[ModelSpec | EnsembleSpec]:
    """Every model of the repository, from the exported models' serving facts, as release `release`:
    each model inside the ensembles loads that version, holds what is the release's own as
    parameters `name@release`, and the ensembles run that release. `release_json` is what
    MODEL_VERSIONS answers (default: only the release number)."""
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
    cs, rs = ct.input_size, rgb.input_size
    n_classes = len(ct.class_names)
    limits = tuning.limits.to_parameters()
    batching = Batching(
        tuning.max_batch_size, max_queue_delay_us=tuning.max_queue_delay_us, max_queue_size=tuning.max_queue_size
    )
    t = {
        api.CT_IMAGE: Tensor(api.CT_IMAGE, "BYTES", (1,)),
        api.CT_META: Tensor(api.CT_META, "FP32", (2,)),
        api.RGB_IMAGE: Tensor(api.RGB_IMAGE, "BYTES", (1,)),
        api.CT_TENSOR: Tensor(api.CT_TENSOR, "FP32", (ct.in_chans, cs, cs)),
        api.RGB_TENSOR: Tensor(api.RGB_TENSOR, "FP32", (rgb.in_chans, rs, rs)),
        api.CT_PROBS: Tensor(api.CT_PROBS, "FP32", (n_classes,)),
        api.CT_CAM: Tensor(api.CT_CAM, "FP32", (cs, cs)),
        api.RGB_SCORE: Tensor(api.RGB_SCORE, "FP32", (1,)),
        api.RGB_ERROR_MAP: Tensor(api.RGB_ERROR_MAP, "FP32", (rs, rs)),
        api.VERDICT: Tensor(api.VERDICT, "INT32", (1,)),
        api.CONFIDENCE: Tensor(api.CONFIDENCE, "FP32", (1,)),
        api.RGB_THRESHOLD: Tensor(api.RGB_THRESHOLD, "FP32", (1,)),
        api.CT_OOD: Tensor(api.CT_OOD, "FP32", (1,)),
        api.RGB_OOD: Tensor(api.RGB_OOD, "FP32", (1,)),
        api.MODEL_VERSIONS: Tensor(api.MODEL_VERSIONS, "BYTES", (1,)),
    }
    own = partial(api.release_key, release=release)  # a parameter of this release: "rule@2"
    pinned = partial(Step, version=release)

    def ts(*names):
        return tuple(t[n] for n in names)

    def identity(*names):
        return {n: n for n in names}

    def internal(*names):  # a network's outputs on their way to `verdict` (api.PASSED_THROUGH says why)
        return {n: api.internal(n) for n in names}

    def from_internal(*names):  # `verdict` reads them under the same internal names
        return {api.internal(n): api.internal(n) for n in names}

    ct_outputs = (api.CT_PROBS, api.CT_CAM, api.CT_OOD)
    rgb_outputs = (api.RGB_SCORE, api.RGB_ERROR_MAP, api.RGB_OOD)
    ct_pre = pinned(api.CT_PREPROCESS, identity(api.CT_IMAGE, api.CT_META), identity(api.CT_TENSOR))
    rgb_pre = pinned(api.RGB_PREPROCESS, identity(api.RGB_IMAGE), identity(api.RGB_TENSOR))
    both_pre = pinned(
        api.PREPROCESS, identity(api.CT_IMAGE, api.CT_META, api.RGB_IMAGE), identity(api.CT_TENSOR, api.RGB_TENSOR)
    )
    ct_net_to_verdict = pinned(api.CT_CLASSIFIER, identity(api.CT_TENSOR, api.CT_META), internal(*ct_outputs))
    rgb_net_to_verdict = pinned(api.RGB_AUTOENCODER, identity(api.RGB_TENSOR), internal(*rgb_outputs))

    def passed(name: str, optional: bool = True) -> Tensor:  # a verdict input: a network's output, internal name
        return Tensor(api.internal(name), t[name].dtype, t[name].dims, optional=optional)

    mb = tuning.max_batch_size
    return [
        ModelSpec(
            api.PREPROCESS,
            ts(api.CT_IMAGE, api.CT_META, api.RGB_IMAGE),
            ts(api.CT_TENSOR, api.RGB_TENSOR),
            batching=batching,
            instances=tuning.preprocess_instances,
            parameters={own(f"ct_{CONFIG_KEY}"): ct.to_json(), own(f"rgb_{CONFIG_KEY}"): rgb.to_json(), **limits},
            versions=(release,),
        ),
        ModelSpec(
            api.CT_PREPROCESS,
            ts(api.CT_IMAGE, api.CT_META),
            ts(api.CT_TENSOR),
            batching=batching,
            instances=tuning.preprocess_instances,
            parameters={own(CONFIG_KEY): ct.to_json(), **limits},
            versions=(release,),
        ),
        _network(
            api.CT_CLASSIFIER,
            runtime,
            ts(api.CT_TENSOR, api.CT_META),
            ts(api.CT_PROBS, api.CT_CAM, api.CT_OOD),
            tuning,
            release,
        ),
        ModelSpec(
            api.RGB_PREPROCESS,
            ts(api.RGB_IMAGE),
            ts(api.RGB_TENSOR),
            batching=batching,
            instances=tuning.preprocess_instances,
            parameters={own(CONFIG_KEY): rgb.to_json(), **limits},
            versions=(release,),
        ),
        _network(
            api.RGB_AUTOENCODER,
            runtime,
            ts(api.RGB_TENSOR),
            ts(api.RGB_SCORE, api.RGB_ERROR_MAP, api.RGB_OOD),
            tuning,
            release,
        ),
        ModelSpec(
            api.VERDICT_MODEL,
            (
                passed(api.RGB_SCORE),
                Tensor(api.CT_META, "FP32", (2,), optional=True),
                *(passed(n) for n in (api.CT_PROBS, api.CT_CAM, api.RGB_ERROR_MAP, api.CT_OOD, api.RGB_OOD)),
            ),
            ts(*api.INSPECT_OUTPUTS),
            batching=batching,
            parameters={
                own("rule"): rule_json,
                own(api.RELEASE_PARAMETER): release_json or json.dumps({"release": release}),
            },
            versions=(release,),
        ),
        EnsembleSpec(
            api.INSPECT,
            ts(api.CT_IMAGE, api.CT_META, api.RGB_IMAGE),
            ts(*api.INSPECT_OUTPUTS),
            (
                both_pre,
                ct_net_to_verdict,
                rgb_net_to_verdict,
                pinned(
                    api.VERDICT_MODEL,
                    identity(api.CT_META) | from_internal(*ct_outputs, *rgb_outputs),
                    identity(*api.INSPECT_OUTPUTS),
                ),
            ),
            mb,
        ),
        EnsembleSpec(
            api.INSPECT_CT,
            ts(api.CT_IMAGE, api.CT_META),
            ts(*api.INSPECT_CT_OUTPUTS),
            (
                ct_pre,
                ct_net_to_verdict,
                pinned(api.VERDICT_MODEL, from_internal(*ct_outputs), identity(*api.INSPECT_CT_OUTPUTS)),
            ),
            mb,
        ),
        EnsembleSpec(
            api.INSPECT_RGB,
            ts(api.RGB_IMAGE),
            ts(*api.INSPECT_RGB_OUTPUTS),
            (
                rgb_pre,
                rgb_net_to_verdict,
                pinned(api.VERDICT_MODEL, from_internal(*rgb_outputs), identity(*api.INSPECT_RGB_OUTPUTS)),
            ),
            mb,
        ),
    ]


PYTHON_SOURCES = {
    api.PREPROCESS: "preprocess.py",
    api.CT_PREPROCESS: "ct_preprocess.py",
    api.RGB_PREPROCESS: "rgb_preprocess.py",
    api.VERDICT_MODEL: "verdict.py",
}


KEPT_FILES = ("README.md", "audit.jsonl")  # the folder's documentation, and the record of its releases


def _lower_precision(exported: dict, found: dict, tuning: Tuning, progress) -> None:
    """Replace each exported network by its FP16 or INT8 variant (INT8 calibrated on the runs' data),
    saying how far its answers moved on real inputs."""

    source = tuning.calibration or torch.load(
        found["ct_classifier"] / CHECKPOINT, map_location="cpu", weights_only=False, mmap=True
    ).get("data")
    if not source:
        raise ValueError(f"{tuning.precision} needs images to calibrate or check on: give --calibration DIR")
    progress(
        f"converting the networks to {tuning.precision.upper()}"
        + (f", calibrated on {source}" if tuning.precision == "int8" else "")
    )
    feeds = calibration_tensors(source, exported["ct_classifier"].facts, exported["rgb_autoencoder"].facts)
    for kind, e in exported.items():
        names = (api.CT_TENSOR, api.CT_META) if kind == "ct_classifier" else (api.RGB_TENSOR,)
        inputs = {n: feeds[n] for n in names}
        lowered = e.onnx_path.with_suffix(f".{tuning.precision}.onnx")
        if tuning.precision == "int8":
            quantize_int8(e.onnx_path, lowered, inputs)
        else:
            to_fp16(e.onnx_path, lowered)
        before, after = (
            ort.InferenceSession(str(f), providers=["CPUExecutionProvider"]).run(None, inputs)[0]
            for f in (e.onnx_path, lowered)
        )
        change = f"max |{tuning.precision.upper()} - FP32| of the first output {np.abs(after - before).max():.2e}"
        if kind == "ct_classifier":
            change += f", same top class on {np.mean(after.argmax(1) == before.argmax(1)):.1%} of {len(before)} slices"
        progress(f"  {e.name}: {change}")
        lowered.replace(e.onnx_path)


def _write_release(
    found: dict[str, Path],
    runtime: str,
    folder: Path,
    release: int,
    rule_path,
    tuning: Tuning,
    progress,
) -> tuple[list, dict]:
    """Export the runs as release `release` into `folder`: `<model>/<release>/` of every model and
    the specs of the whole repository for it. Returns (specs, the release's manifest entry)."""
    exported = {}
    for kind, run in found.items():
        progress(f"exporting {run} to ONNX (parity-checked against PyTorch)")
        e = export_run(run, folder / "_onnx")
        worst = max((v for diffs in e.parity.values() for v in diffs.values()), default=0.0)
        progress(f"  {e.name}: max |ONNX Runtime - PyTorch| {worst:.1e} on batches {sorted(e.parity)}")
        if e.facts.ood_gate is None:
            progress(
                f"  warning: {run} has no out-of-distribution gate, so {e.name} refuses nothing (its OOD score "
                "is 0); "
                f"fit one with 'python -m training.ood {run}'"
            )
        exported[kind] = e
    ct, rgb = exported["ct_classifier"].facts, exported["rgb_autoencoder"].facts
    if tuning.precision != "fp32":
        _lower_precision(exported, found, tuning, progress)
    if ct.class_names != CT_CLASSES:
        raise ValueError(
            f"the CT checkpoint's classes {list(ct.class_names)} differ from the public order {list(CT_CLASSES)}"
        )
    rule = load_rule(rgb, ct.class_names, rule_path)
    digests = {kind: checkpoint_digest(run) for kind, run in found.items()}
    described = {"release": release} | {kind: digests[kind][:12] for kind in sorted(digests)}
    specs = model_specs(ct, rgb, rule.to_json(), runtime, tuning, release, json.dumps(described, sort_keys=True))
    for spec in specs:
        if isinstance(spec, ModelSpec):
            (folder / spec.name / str(release)).mkdir(parents=True)
            if spec.backend == "python":
                source = PYTHON_SOURCES.get(spec.name, "onnx_runner.py")
                shutil.copy(SOURCES / source, folder / spec.name / str(release) / "model.py")
        else:
            (folder / spec.name / "1").mkdir(parents=True, exist_ok=True)  # an ensemble's version is always 1
    for e in exported.values():
        e.onnx_path.replace(folder / e.name / str(release) / "model.onnx")
    shutil.rmtree(folder / "_onnx")
    entry = {
        "runs": {kind: _run_record(run, digests[kind]) for kind, run in found.items()},
        "rule": json.loads(rule.to_json()),
        "precision": tuning.precision,
        "built": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }
    return specs, entry


def _run_record(run: Path, digest: str) -> dict:
    """What a release records of a run: where, which checkpoint, and what it was trained on and how."""
    ckpt = torch.load(run / CHECKPOINT, map_location="cpu", weights_only=False, mmap=True)
    config = ckpt.get("config") or {}
    side = "ct" if ckpt.get("kind") == "ct_classifier" else "rgb"
    record = {"path": str(run.resolve()), "checkpoint_sha256": digest}
    record |= {k: ckpt[k] for k in ("data", "epochs_trained", "val_macro_f1", "threshold") if k in ckpt}
    if side in config:
        record["config"] = config[side]
    reviewed = run / REVIEWED_RUN_FILE  # the reviewed line cells it learnt from (training.data.reviewed)
    if reviewed.exists():
        held = json.loads(reviewed.read_text())
        record["reviewed"] = {
            "folders": held.get("folders", []),
            "trained": len(held.get("trained", [])),
            "held_out": len(held.get("held_out", [])),
        }
    return record


def build_repository(
    runs, runtime: str, out: str | Path, rule_path: str | Path | None = None, tuning: Tuning = Tuning(), progress=print
) -> dict:
    """Export the runs and write the whole repository to `out` (replaced only when all succeeded),
    serving them as release 1."""
    out = Path(out)
    found = classify_runs(runs)
    out.parent.mkdir(parents=True, exist_ok=True)  # staged beside it: the final rename stays on one file system
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        specs, entry = _write_release(found, runtime, staging, 1, rule_path, tuning, progress)
        for spec in specs:
            (staging / spec.name / "config.pbtxt").write_text(to_pbtxt(spec))
        manifest = {
            "runtime": runtime,
            "runs": entry["runs"],
            "rule": entry["rule"],
            "models": [s.name for s in specs],
            "build_sha256": _build_digest(rule_path, tuning),
            "precision": tuning.precision,
            "built": entry["built"],
            **release_state({"1": entry}, serving=1),
        }
        if runtime == "tensorrt":
            manifest["todo"] = (
                "TensorRT engines (model.plan) are not built yet: run 'python -m export tensorrt "
                f"{out}' on the GPU that will serve them"
            )
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        if out.exists():
            for keep in KEPT_FILES:  # the folder's own documentation survives a rebuild
                if (out / keep).is_file():
                    shutil.copy2(out / keep, staging / keep)
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out.replace(old)
            staging.replace(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.replace(out)
        return manifest
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def stage_release(
    repository: str | Path, runs, rule_path: str | Path | None = None, tuning: Tuning | None = None, progress=print
) -> int:
    """Export the runs into a built repository as its next release, staged: it serves no traffic
    (`inspect` and the others keep their release); `inspect_staged` runs it. Each model keeps
    the releases in service and the previous one loaded beside it (export.release). Returns the
    new release's number; the repository is unchanged where anything fails."""
    repository = Path(repository)
    state = read_state(repository)
    manifest = json.loads((repository / MANIFEST).read_text())
    found = classify_runs(runs)
    tuning = tuning or Tuning(precision=manifest.get("precision", "fp32"))
    release = max(map(int, state["releases"])) + 1
    scratch = Path(tempfile.mkdtemp(prefix=f".{repository.name}.stage.", dir=repository.parent))
    try:
        specs, entry = _write_release(found, manifest["runtime"], scratch, release, rule_path, tuning, progress)
        configs = merged_configs(repository, specs, release, keep=kept_releases(state, release))
        for spec in specs:  # files first, configs after: a config never names a version without its files
            if isinstance(spec, ModelSpec):
                shutil.copytree(scratch / spec.name / str(release), repository / spec.name / str(release))
                # compiled now, by the backend's Python (serving.server.compile_adapters says why)
                compileall.compile_dir(str(repository / spec.name / str(release)), quiet=1)
        for name, text in configs.items():
            (repository / name / "config.pbtxt").write_text(text)
        entry["staged"] = entry.pop("built")
        state["releases"][str(release)] = entry
        state["staged"] = release
        write_state(repository, state)
        write_staged_ensembles(repository, release)
        return release
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def is_current(
    out: str | Path, runs, runtime: str, rule_path: str | Path | None = None, tuning: Tuning = Tuning()
) -> bool:
    """Whether `out` was built from exactly these checkpoints, adapters, rule and tuning for this runtime."""
    path = Path(out) / MANIFEST
    if not path.exists():
        return False
    try:
        manifest = json.loads(path.read_text())
        found = classify_runs(runs)
    except (ValueError, OSError, json.JSONDecodeError):
        return False
    recorded = manifest.get("runs", {})
    return (
        manifest.get("runtime") == runtime
        and manifest.get("build_sha256") == _build_digest(rule_path, tuning)
        and set(recorded) == set(found)
        and all(
            recorded[k]["path"] == str(run.resolve()) and recorded[k]["checkpoint_sha256"] == checkpoint_digest(run)
            for k, run in found.items()
        )
    )
