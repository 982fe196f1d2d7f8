"""The real model's component configs, in one place: the shapes every full-size figure is built from.

Why this exists: the memory harness (placement/measure.py) and the GPU benchmarks
(bench/realshapes.py) build the real transformer, text encoder and VAE without their weights, so
both need the published configs, and they must be the same ones.  They are typed in here because
no hub is reachable: `tests/test_realconfig.py` pins them against the published values.

Sources (the `config.json` of each published folder):
- transformer: Qwen/Qwen-Image-Edit(-2509/-2511) `transformer/config.json`; diffusers 0.42's
  QwenImageTransformer2DModel defaults are that 20.4 B model's config, except `zero_cond_t`
  (true for 2511 only, facts.md section 1);
- VAE: `vae/config.json`, equal to AutoencoderKLQwenImage's defaults (127 M parameters);
- text encoder: Qwen2.5-VL-7B-Instruct's config (`text_encoder/config.json`), vision tower
  included; transformers' Qwen2_5_VLConfig defaults are the 72 B model's, so every width is given.
"""

from __future__ import annotations

from typing import Any

TRANSFORMER_CONFIG: dict[str, Any] = {
    "patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": 60, "attention_head_dim": 128,
    "num_attention_heads": 24, "joint_attention_dim": 3584, "guidance_embeds": False,
    "axes_dims_rope": (16, 56, 56),
}
VAE_CONFIG: dict[str, Any] = {
    "base_dim": 96, "z_dim": 16, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_scales": [],
    "temperal_downsample": [False, True, True], "dropout": 0.0,
}
TEXT_CONFIG: dict[str, Any] = {
    "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
    "num_key_value_heads": 4, "vocab_size": 152064, "max_position_embeddings": 128000,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
}
VISION_CONFIG: dict[str, Any] = {
    "depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "out_hidden_size": 3584,
    "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
    "fullatt_block_indexes": [7, 15, 23, 31],
}
# Qwen2.5-VL's own token ids (its tokenizer's added tokens), used where no tokenizer is given.
TOKEN_IDS = {"<|image_pad|>": 151655, "<|video_pad|>": 151656, "<|vision_start|>": 151652,
             "<|vision_end|>": 151653}
VOCAB_SIZE = 152064


def text_encoder_config(layers: int | None = None, token_ids: dict[str, int] | None = None,
                        vision_layers: int | None = None) -> Any:
    """The Qwen2.5-VL-7B config (or the same widths with `layers` text and vision layers).

    `token_ids` maps the four vision special tokens to ids (a tokenizer's); Qwen's own by default.
    `vision_layers` gives the vision tower its own depth (default: `layers`; its real 32 keeps it whole).
    """
    from transformers import Qwen2_5_VLConfig

    text, vision = dict(TEXT_CONFIG), dict(VISION_CONFIG)
    if layers is not None:  # same widths, fewer layers
        text["num_hidden_layers"] = layers
    depth = layers if vision_layers is None else vision_layers
    if depth is not None and depth != VISION_CONFIG["depth"]:
        vision["depth"], vision["fullatt_block_indexes"] = depth, [depth - 1]
    ids = {**TOKEN_IDS, **(token_ids or {})}
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, vocab_size=VOCAB_SIZE,
                            image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                            vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])


def transformer_config(zero_cond_t: bool, layers: int | None = None) -> dict[str, Any]:
    """QwenImageTransformer2DModel's keyword arguments (or the same widths with `layers` blocks)."""
    config = {**TRANSFORMER_CONFIG, "zero_cond_t": zero_cond_t}
    if layers is not None:
        config["num_layers"] = layers
    return config
