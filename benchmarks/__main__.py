"""python -m benchmarks COMMAND ... (serving, overload, cancel, decode, ood, robustness, int8, soak, gateway,
plant, outputs, study, synth, training)

Cells are line-size by default (CT 4000 x 4000 with some 16-bit TIFF and DICOM slices,
photos 1920 x 1080), generated once into build/bench_data/; each command's --help says more.

  serving   Triton end to end (load generator + perf_analyzer) against the best in-process
            end-to-end pipeline, the networks alone, and the original system's per-cell path,
            with SGEMM and FLOPs (`make bench`)
  decode    line-size images (4000 x 4000 CT, 1920 x 1080 photos) to model inputs, per format, one core
  ood       the out-of-distribution gate: false rejections of fresh test cells, and per kind
            of foreign input (photos, medical images, documents, noise, swapped inputs, an
            empty bench...) the share refused, with the AUROC of its score
  robustness  acquisition drift (CT window and level, gamma, noise, blur, rings, JPEG,
            rotation; photo exposure, white balance, blur, noise, JPEG, framing, background)
            at three strengths: CT macro-F1, RGB AUROC and the gate's refusals
  int8      INT8 against FP32 for the CT classifier: throughput and macro-F1 on a test split
  soak      hours at 80% of saturation (failures, server memory growth), then a burst at 3x
  gateway   trigger-to-answer latency through the line gateway (simulated OPC UA PLC) at a line rate
  outputs   what the outputs asked for cost: inspect with all of them, without the maps, with
            VERDICT and CONFIDENCE only (cells/s, latency, bytes per answer)
  plant     several stations through the gateway to several Triton replicas while one is killed,
            one drained and restarted and a model version rolled across them: cells lost or
            answered twice, latency per phase, traffic per replica
  study     the architecture study: train each registered CT network on one split, evaluate it on
            the same fresh test set, export it and measure what it costs to serve (FLOPs,
            ONNX Runtime FP32/INT8, Triton at line size); table and accuracy/cost frontier
  overload  more cells than a replica carries: answered within the takt, refused at once, lost;
            one replica with a bare client, two behind the project's client
  cancel    requests given up at random moments (deadlines, cancels, dropped connections,
            through tritonclient and raw gRPC): the server must live and answer every later request
  synth     how long the synthetic data generator takes (`make bench-synth`)
  training  where each preset's training time goes: the networks' training GFLOP/s against SGEMM,
            and the share of the real loop spent in the networks' arithmetic
"""

import sys

from benchmarks.cancel import main as cancel
from benchmarks.decode import main as decode
from benchmarks.gateway import main as gateway
from benchmarks.ood import main as ood
from benchmarks.outputs import main as outputs
from benchmarks.overload import main as overload
from benchmarks.plant import main as plant
from benchmarks.quantized import main as int8
from benchmarks.robustness import main as robustness
from benchmarks.serving import main as serving
from benchmarks.soak import main as soak
from benchmarks.study import main as study
from benchmarks.synth_speed import main as synth
from benchmarks.training import main as training


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print(__doc__)
        return 0 if len(sys.argv) >= 2 else 2
    command, rest = sys.argv[1], sys.argv[2:]
    if command == "serving":
        return serving(rest)
    if command == "decode":
        return decode(rest)
    if command == "ood":
        return ood(rest)
    if command == "robustness":
        return robustness(rest)
    if command == "int8":
        return int8(rest)
    if command == "soak":
        return soak(rest)
    if command == "gateway":
        return gateway(rest)
    if command == "outputs":
        return outputs(rest)
    if command == "plant":
        return plant(rest)
    if command == "study":
        return study(rest)
    if command == "overload":
        return overload(rest)
    if command == "cancel":
        return cancel(rest)
    if command == "training":
        return training(rest)
    if command == "synth":
        sys.argv = [f"{sys.argv[0]} synth", *rest]
        synth()
        return 0
    print(f"unknown benchmark {command!r}\n{__doc__}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
