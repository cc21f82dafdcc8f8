"""Small randomly initialised checkpoints, built from configs, for export and serving tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from core.labels import BATTERY_TYPES, CT_CLASSES, SLICE_AXES
from core.preprocess import CT_MEAN, CT_STD
from training.checkpoint import save_checkpoint
from training.models import create_model
from training.models.autoencoder import scorer_from
from training.ood import (
    RGB_FEATURES,
    calibrate,
    ct_feature_array,
    distances,
    fit_ct_gate_on,
    fit_gaussian,
    rgb_feature_array,
)

CLASS_GROUPS = [BATTERY_TYPES.index(name.split("_", 1)[0]) for name in CT_CLASSES]


def ct_gate(model, images, meta) -> dict:
    """An out-of-distribution gate fitted and calibrated on `images` (as training does on its splits),
    every image counted as the class of its battery type's normal class."""
    images, meta = np.asarray(images, np.float32), np.asarray(meta, np.float32)
    labels = np.where(meta[:, 0] == 0, CT_CLASSES.index("cell_normal"), CT_CLASSES.index("module_normal"))
    features = ct_feature_array(model, images, meta)
    return fit_ct_gate_on(features, labels, meta, features, meta, CLASS_GROUPS, {"quantile": 1.0, "margin": 1.5})


def rgb_gate(model, images, score: dict | None = None) -> dict:

    score = score or (
        RGB_SCORE
        if getattr(model, "segmenter", None) is not None
        else {"error": "squared_error_channel_mean", "smooth_sigma": 1.5, "top_fraction": 0.01, "border": 0.06}
    )
    features = rgb_feature_array(scorer_from(model, score), np.asarray(images, np.float32))
    gate = fit_gaussian(features) | {"features": RGB_FEATURES}
    return calibrate(gate, distances(gate, features), {"quantile": 1.0, "margin": 1.5})


CT_ARGS = {"hidden": 32, "dropout": 0.2, "pool": "max"}
RGB_ARGS = {"base": 8, "latent": 16, "depth": 3, "skips": 1, "segment": 8, "segment_depth": 3}
RGB_SCORE = {"error": "segmentation_probability", "smooth_sigma": 1.5, "top_fraction": 0.01, "border": 0.06}


def ct_info(size: int, arch: str, arch_args: dict, temperature: float = 1.3) -> dict:
    return {
        "kind": "ct_classifier",
        "arch": arch,
        "arch_args": arch_args,
        "class_names": list(CT_CLASSES),
        "input_size": size,
        "in_chans": 1,
        "normalization": {"mean": CT_MEAN, "std": CT_STD},
        "temperature": temperature,
        "meta_spec": {
            "names": ["battery_type", "slice_axis"],
            "battery_type": list(BATTERY_TYPES),
            "slice_axis": list(SLICE_AXES),
        },
    }


def rgb_info(size: int, arch_args: dict, score: dict, threshold: float) -> dict:
    return {
        "kind": "rgb_autoencoder",
        "arch": "conv_autoencoder",
        "arch_args": arch_args,
        "input_size": size,
        "in_chans": 3,
        "normalization": {"mean": 0.0, "std": 1.0},
        "score": score,
        "threshold": threshold,
        "threshold_method": "f1",
        "thresholds": {"f1": threshold, "roc": threshold * 1.1},
    }


def settle_batchnorm(model: torch.nn.Module, *inputs) -> torch.nn.Module:
    """Set BatchNorm running statistics from real inputs (as a short training run would),
    so that a random network's outputs vary from image to image instead of saturating."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        model(*inputs)
    return model.eval()


def make_ct_run(
    run: Path,
    size: int = 64,
    arch: str = "resnet18_late_fusion",
    seed: int = 0,
    images=None,
    meta=None,
    gate: bool = False,
    frame: dict | None = None,
    **args,
) -> Path:
    """A CT run; with `gate`, an out-of-distribution gate calibrated on the images (default: none,
    CT_OOD is 0); with `frame` (core.preprocess.fit_frame), the placement check."""
    torch.manual_seed(seed)
    arch_args = CT_ARGS | args
    model = create_model(arch, **arch_args)
    if images is None:
        g = torch.Generator().manual_seed(seed)
        images = torch.randn(16, 1, size, size, generator=g)
        meta = torch.tensor([[i % 2, i % 3] for i in range(16)], dtype=torch.float32)
    settle_batchnorm(model, torch.as_tensor(images), torch.as_tensor(meta))
    info = ct_info(size, arch, arch_args)
    if gate:
        info["ood"] = ct_gate(model, images, meta)
    if frame:
        info["frame"] = frame
    save_checkpoint(run, model, info)
    return Path(run)


def make_fitted_ct_run(run: Path, images, meta, labels, steps: int = 40, seed: int = 0, size: int = 64) -> Path:
    """A small CT classifier fitted to (images, meta) -> labels by full-batch Adam: a champion that
    knows its cells when the labels are true, a challenger that learnt nothing when they are shuffled.
    Seeded, on one thread: the same weights on every run of a machine."""
    torch.manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = create_model("resnet18_late_fusion", **CT_ARGS)
        x, m = torch.as_tensor(images, dtype=torch.float32), torch.as_tensor(meta, dtype=torch.float32)
        y = torch.as_tensor(labels, dtype=torch.long)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        model.train()
        for _ in range(steps):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x, m), y).backward()
            opt.step()
        settle_batchnorm(model, x, m)
    finally:
        torch.set_num_threads(threads)
    save_checkpoint(run, model, ct_info(size, "resnet18_late_fusion", CT_ARGS, temperature=1.0))
    return Path(run)


def make_rgb_run(
    run: Path,
    size: int = 64,
    seed: int = 0,
    threshold: float = 0.5,
    score: dict | None = None,
    images=None,
    gate: bool = False,
    frame: dict | None = None,
    **args,
) -> Path:
    torch.manual_seed(seed)
    arch_args = RGB_ARGS | args
    model = create_model("conv_autoencoder", **arch_args)
    if images is None:
        images = torch.rand(8, 3, size, size, generator=torch.Generator().manual_seed(seed))
    settle_batchnorm(model, torch.as_tensor(images))
    if arch_args.get("segment"):  # the head's BatchNorms too
        with torch.no_grad():
            model.train()
            x = torch.as_tensor(images)
            model.segment_logits(x, model(x))
            model.eval()
    info = rgb_info(
        size,
        arch_args,
        score
        or (
            RGB_SCORE
            if arch_args.get("segment")
            else {"error": "squared_error_channel_mean", "smooth_sigma": 1.5, "top_fraction": 0.01, "border": 0.06}
        ),
        threshold,
    )
    if gate:
        info["ood"] = rgb_gate(model, images, info["score"])
    if frame:
        info["frame"] = frame
    save_checkpoint(run, model, info)
    return Path(run)


def gap_threshold(values: np.ndarray, low: float = 0.3, high: float = 0.7) -> tuple[float, float]:
    """A threshold in the widest gap between sorted values within the given quantile range,
    and the gap's half-width: no value lies closer to it than that."""
    v = np.sort(np.asarray(values, np.float64))
    a, b = int(len(v) * low), max(int(len(v) * high), int(len(v) * low) + 2)
    gaps = np.diff(v[a:b])
    i = int(gaps.argmax())
    return float((v[a + i] + v[a + i + 1]) / 2), float(gaps[i] / 2)


# --- explanation backends: tiny randomly initialised transformers models, saved like downloaded weights ---

VLM_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# Qwen's chat template, reduced to what a user turn with images and text needs
VLM_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.content is string %}{{ m.content }}{% else %}"
    "{% for c in m.content %}{% if c.type == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c.type == 'text' %}{{ c.text }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_qwen_vl(folder: Path, generation: int = 3, seed: int = 0) -> Path:
    """A two-layer Qwen3-VL (or Qwen2-VL) with a byte-level BPE tokenizer trained on a few prompt
    words; saved with its processor so `AutoProcessor` / `AutoModelForImageTextToText` load it."""
    import transformers as tf  # noqa: PLC0415 - optional heavy dependency
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: PLC0415 - optional heavy dependency

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [
        "battery cell porosity void resin overflow scratch dent "
        '{"class": "cell_porosity", "verdict": "defect"} 배터리 결함'
    ]
    tok.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=list(VLM_SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    ids = {t: fast.convert_tokens_to_ids(t) for t in VLM_SPECIAL_TOKENS}
    tokens = dict(
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    text = dict(
        vocab_size=len(fast),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    if generation == 3:
        patch, cls = 16, tf.Qwen3VLForConditionalGeneration
        config = tf.Qwen3VLConfig(
            text_config=text
            | dict(
                head_dim=16,
                rope_parameters={
                    "rope_type": "default",
                    "rope_theta": 10000.0,
                    "mrope_section": [2, 3, 3],
                    "mrope_interleaved": True,
                },
            ),
            vision_config=dict(
                depth=2,
                hidden_size=32,
                intermediate_size=64,
                num_heads=2,
                patch_size=patch,
                spatial_merge_size=2,
                temporal_patch_size=2,
                out_hidden_size=32,
                num_position_embeddings=64,
                deepstack_visual_indexes=[0],
            ),
            tie_word_embeddings=False,
            **tokens,
        )
        processor_cls, video = tf.Qwen3VLProcessor, tf.Qwen3VLVideoProcessor()
    elif generation == 2:
        patch, cls = 14, tf.Qwen2VLForConditionalGeneration
        config = tf.Qwen2VLConfig(
            text_config=text
            | dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}),
            vision_config=dict(
                depth=2,
                embed_dim=32,
                hidden_size=32,
                num_heads=2,
                mlp_ratio=2,
                patch_size=patch,
                spatial_merge_size=2,
                temporal_patch_size=2,
            ),
            **tokens,
        )
        processor_cls, video = tf.Qwen2VLProcessor, tf.Qwen2VLVideoProcessor()
    else:
        raise ValueError(f"no Qwen-VL generation {generation}")
    images = tf.Qwen2VLImageProcessor(
        patch_size=patch, merge_size=2, temporal_patch_size=2, min_pixels=(2 * patch) ** 2, max_pixels=(4 * patch) ** 2
    )
    processor = processor_cls(
        image_processor=images, tokenizer=fast, video_processor=video, chat_template=VLM_CHAT_TEMPLATE
    )
    torch.manual_seed(seed)
    cls(config).eval().save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


GROUNDING_WORDS = (
    "[PAD]",
    "[UNK]",
    "[CLS]",
    "[SEP]",
    "[MASK]",
    ".",
    "porosity",
    "void",
    "pore",
    "resin",
    "overflow",
    "scratch",
    "dent",
    "stain",
    "contamination",
)


def make_grounding_dino(folder: Path, seed: int = 0) -> Path:
    """A one-stage Swin + one-layer BERT GroundingDINO with a word-level vocabulary of the prompt words."""
    from transformers import (  # noqa: PLC0415 - optional heavy dependency
        BertConfig,
        BertTokenizerFast,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
        SwinConfig,
    )

    tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(GROUNDING_WORDS)})
    processor = GroundingDinoProcessor(
        image_processor=GroundingDinoImageProcessor(size={"shortest_edge": 128, "longest_edge": 160}),
        tokenizer=tokenizer,
    )
    config = GroundingDinoConfig(
        backbone_config=SwinConfig(
            image_size=64,
            embed_dim=16,
            depths=[1, 1, 1, 1],
            num_heads=[1, 1, 2, 2],
            window_size=4,
            out_indices=[2, 3, 4],
        ),
        text_config=BertConfig(
            vocab_size=len(GROUNDING_WORDS),
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
        ),
        d_model=32,
        encoder_layers=1,
        decoder_layers=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        num_queries=20,
        num_feature_levels=4,
        encoder_n_points=2,
        decoder_n_points=2,
        max_text_len=32,
    )
    torch.manual_seed(seed)
    GroundingDinoForObjectDetection(config).eval().save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
