"""Command-line options for explanations (`inspect` and `inspect-dir --explain`) and the
pipeline they describe. A backend that cannot be set up (no key, no weights) is reported
once and its part is marked unavailable, with the reason, in every report."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from client.explain.explainers import (
    CAM_METHODS,
    CAM_THRESHOLD,
    CTHeatmap,
    Grounding,
    RGBErrorMap,
    Unavailable,
    VLMFinding,
)
from client.explain.grounding import GROUNDING_BACKENDS, make_grounding
from client.explain.pipeline import ExplanationPipeline
from client.explain.prompts import LANGUAGES
from client.explain.vlm import KEY_VARIABLES, VLM_BACKENDS, make_vlm


def add_arguments(p: argparse.ArgumentParser, folder_default: str) -> None:
    g = p.add_argument_group("explanations of flagged cells (off the hot path)")
    g.add_argument(
        "--explain",
        nargs="?",
        type=Path,
        const=Path(folder_default),
        metavar="DIR",
        help=f"write a JSON + HTML report per flagged cell and an index page into DIR (default {folder_default})",
    )
    g.add_argument(
        "--gradcam",
        choices=("server", "torch"),
        default="server",
        help="server: the CT_CAM the service computes (free); torch: recompute with pytorch-grad-cam on the checkpoint",
    )
    g.add_argument(
        "--gradcam-method",
        choices=sorted(CAM_METHODS),
        default="gradcam",
        help="pytorch-grad-cam method for --gradcam torch",
    )
    g.add_argument(
        "--gradcam-checkpoint",
        type=Path,
        metavar="RUN",
        help="CT run folder or .pt for --gradcam torch (default: the --local runs)",
    )
    g.add_argument(
        "--cam-threshold",
        type=float,
        default=CAM_THRESHOLD,
        help=f"CAM level boxed as a hot region (default {CAM_THRESHOLD})",
    )
    g.add_argument(
        "--error-threshold",
        type=float,
        help="error level contoured and boxed on the photo (default: the service's RGB threshold)",
    )
    g.add_argument(
        "--vlm",
        choices=("none", *VLM_BACKENDS),
        default="none",
        help=f"VLM finding: gemini (key from {' or '.join(KEY_VARIABLES)}) or qwen-vl (local weights)",
    )
    g.add_argument("--vlm-model", default="gemini-2.5-flash", help="Gemini model name (default gemini-2.5-flash)")
    g.add_argument(
        "--vlm-weights", type=Path, metavar="DIR", help="Qwen3-VL / Qwen2-VL weights folder for --vlm qwen-vl"
    )
    g.add_argument("--vlm-timeout", type=float, default=60.0, help="seconds per Gemini attempt (default 60)")
    g.add_argument(
        "--vlm-attempts", type=int, default=4, help="Gemini attempts, with backoff on 429/5xx/timeouts (default 4)"
    )
    g.add_argument("--gemini-url", help="Gemini API base URL (a proxy or gateway; default Google's)")
    g.add_argument("--lang", choices=LANGUAGES, default="en", help="prompt and answer language (default en)")
    g.add_argument(
        "--grounding", choices=("none", *GROUNDING_BACKENDS), default="none", help="GroundingDINO boxes backend"
    )
    g.add_argument(
        "--grounding-weights",
        type=Path,
        metavar="PATH",
        help="GroundingDINO weights folder (transformers) or .pth (groundingdino)",
    )
    g.add_argument(
        "--grounding-config", type=Path, metavar="FILE", help="GroundingDINO config .py for --grounding groundingdino"
    )
    g.add_argument("--box-threshold", type=float, default=0.35, help="GroundingDINO box score threshold (default 0.35)")
    g.add_argument("--text-threshold", type=float, default=0.25, help="GroundingDINO phrase threshold (default 0.25)")
    g.add_argument(
        "--explain-workers",
        type=int,
        help="explanation workers (default 1, which leaves the CPU to the inspections; 4 with --vlm gemini, "
        "whose workers mostly wait on the network)",
    )
    g.add_argument(
        "--explain-backlog",
        type=int,
        default=256,
        help="cells waiting for explanation before new ones are skipped (default 256)",
    )


def _setup(name: str, build):
    try:
        return build()
    except Exception as e:
        print(f"warning: {name} unavailable: {e}", file=sys.stderr)
        return Unavailable(name, str(e))


def build_explainers(args) -> list:
    torch_cam = None
    if args.gradcam == "torch":
        checkpoint = args.gradcam_checkpoint or (args.local[0] if getattr(args, "local", None) else None)
        if checkpoint is None:
            raise SystemExit("error: --gradcam torch needs the CT checkpoint: --gradcam-checkpoint RUN")

        # torch, the export and training packages and a checkpoint: only for this audit path
        from client.explain.gradcam import TorchCAM  # noqa: PLC0415 - see above

        torch_cam = TorchCAM(checkpoint, args.gradcam_method)
    explainers = [CTHeatmap(torch_cam, args.cam_threshold), RGBErrorMap(args.error_threshold)]
    if args.vlm != "none":
        options = (
            {"timeout": args.vlm_timeout, "attempts": args.vlm_attempts, "base_url": args.gemini_url}
            if args.vlm == "gemini"
            else {}
        )
        backend = _setup("vlm", lambda: make_vlm(args.vlm, args.vlm_model, args.vlm_weights, **options))
        explainers.append(
            backend if isinstance(backend, Unavailable) else VLMFinding(backend, args.lang, args.cam_threshold)
        )
    if args.grounding != "none":
        backend = _setup(
            "grounding", lambda: make_grounding(args.grounding, args.grounding_weights, args.grounding_config)
        )
        explainers.append(
            backend if isinstance(backend, Unavailable) else Grounding(backend, args.box_threshold, args.text_threshold)
        )
    return explainers


def build_pipeline(args, title: str = "", **options) -> ExplanationPipeline:
    """The pipeline the options ask for; `options` go to ExplanationPipeline (index_every_s, resume)."""
    workers = args.explain_workers or (4 if args.vlm == "gemini" else 1)
    return ExplanationPipeline(
        build_explainers(args), args.explain, workers=workers, max_backlog=args.explain_backlog, title=title, **options
    )
