"""Tiny random-weight Qwen-Image-Edit pipelines, built in code with no download.

Why this exists: the real model is ~58 GB and no hub is reachable from CI or a laptop.  The
tiny pipeline uses the *same classes* as the real one (QwenImageTransformer2DModel,
AutoencoderKLQwenImage, Qwen2_5_VLForConditionalGeneration, Qwen2VLProcessor,
FlowMatchEulerDiscreteScheduler) at toy sizes, so everything the worker does around the model
(LoRA load/check/fuse, scheduler, attention dispatcher, VAE slicing/tiling, sizing, timing) runs
for real in a second on a CPU.  Its output is noise: it proves the wiring, not image quality.

Shape rules (facts.md section 5): transformer in_channels = 4 * vae z_dim, out_channels = z_dim;
joint_attention_dim = text hidden size = vision out_hidden_size; sum(axes_dims_rope) =
attention_head_dim; the text rope's mrope_section sums to head_dim / 2.  The VAE uses
dim_mult [1, 2, 4, 4] with temperal_downsample [False, True, True], so its scale factor is 8 as in
the real model and the worker's size arithmetic is the real one.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..weights.variants import Variant

TINY_SEED = 0
HIDDEN = 16
HEAD_DIM = 16
NUM_LAYERS = 2
LORA_RANK = 4
# The LightX2V Lightning files carry these modules in every transformer block.
LORA_MODULES = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
    "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2",
    "img_mod.1", "txt_mod.1",
)
# Qwen-Image's own base scheduler config (the baked model ships the same).
BASE_SCHEDULER_CONFIG: dict[str, Any] = {
    "base_image_seq_len": 256, "base_shift": 0.5, "invert_sigmas": False, "max_image_seq_len": 8192,
    "max_shift": 0.9, "num_train_timesteps": 1000, "shift": 1.0, "shift_terminal": 0.02,
    "stochastic_sampling": False, "time_shift_type": "exponential", "use_beta_sigmas": False,
    "use_dynamic_shifting": True, "use_exponential_sigmas": False, "use_karras_sigmas": False,
}
SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)


def build_tokenizer() -> Any:
    """A byte-level BPE tokenizer with no merges and Qwen's special tokens (offline)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: index for index, symbol in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
        model_max_length=4096,
    )


def _text_encoder(tokenizer: Any) -> Any:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = Qwen2_5_VLConfig(
        text_config={
            "hidden_size": HIDDEN, "intermediate_size": HIDDEN, "num_hidden_layers": NUM_LAYERS,
            "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": len(tokenizer),
            "max_position_embeddings": 4096, "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0,
                                "mrope_section": [1, 1, 2]},
        },
        vision_config={
            "depth": NUM_LAYERS, "hidden_size": HIDDEN, "intermediate_size": HIDDEN,
            "num_heads": 2, "out_hidden_size": HIDDEN, "fullatt_block_indexes": [1],
        },
        vocab_size=len(tokenizer),
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def base_scheduler() -> Any:
    """The base model's FlowMatchEulerDiscreteScheduler (before any Lightning config)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_config(BASE_SCHEDULER_CONFIG)


def build_components(variant: Variant, scheduler: Any) -> dict[str, Any]:
    """Every component of a tiny pipeline for `variant`, deterministic for a given seed."""
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    torch.manual_seed(TINY_SEED)
    z_dim = 4
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=4 * z_dim, out_channels=z_dim, num_layers=NUM_LAYERS,
        attention_head_dim=HEAD_DIM, num_attention_heads=3, joint_attention_dim=HIDDEN,
        axes_dims_rope=(8, 4, 4), zero_cond_t=variant.zero_cond_t,
    )
    vae = AutoencoderKLQwenImage(
        base_dim=24, z_dim=z_dim, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
        temperal_downsample=[False, True, True], latents_mean=[0.0] * z_dim,
        latents_std=[1.0] * z_dim,
    )
    tokenizer = build_tokenizer()
    text_encoder = _text_encoder(tokenizer)
    components: dict[str, Any] = {
        "transformer": transformer.eval(), "vae": vae.eval(), "text_encoder": text_encoder,
        "tokenizer": tokenizer, "scheduler": scheduler,
        "processor": Qwen2VLProcessor(
            image_processor=Qwen2VLImageProcessor(), tokenizer=tokenizer,
            video_processor=Qwen2VLVideoProcessor(),
        ),
    }
    return components


def lora_state_dict(rank: int = LORA_RANK, prefix: str = "transformer_blocks") -> dict[str, torch.Tensor]:
    """A Lightning-shaped LoRA in LightX2V's key format for the tiny transformer.

    Keys look like `transformer_blocks.0.attn.to_q.lora_down.weight` / `.lora_up.weight` /
    `.alpha`, exactly the real file's layout, so diffusers' converter path is exercised.
    Pass another `prefix` to get a file whose keys match nothing (the silent-failure case).
    """
    inner = 3 * HEAD_DIM
    shapes = {  # (in_features, out_features) of each LoRA'd linear in the tiny transformer
        "attn.to_q": (inner, inner), "attn.to_k": (inner, inner), "attn.to_v": (inner, inner),
        "attn.to_out.0": (inner, inner), "attn.add_q_proj": (inner, inner),
        "attn.add_k_proj": (inner, inner), "attn.add_v_proj": (inner, inner),
        "attn.to_add_out": (inner, inner), "img_mlp.net.0.proj": (inner, 4 * inner),
        "img_mlp.net.2": (4 * inner, inner), "txt_mlp.net.0.proj": (inner, 4 * inner),
        "txt_mlp.net.2": (4 * inner, inner), "img_mod.1": (inner, 6 * inner),
        "txt_mod.1": (inner, 6 * inner),
    }
    generator = torch.Generator().manual_seed(TINY_SEED + 1)
    state: dict[str, torch.Tensor] = {}
    for block in range(NUM_LAYERS):
        for module in LORA_MODULES:
            fan_in, fan_out = shapes[module]
            key = f"{prefix}.{block}.{module}"
            state[f"{key}.lora_down.weight"] = torch.randn(rank, fan_in, generator=generator) * 0.5
            state[f"{key}.lora_up.weight"] = torch.randn(fan_out, rank, generator=generator) * 0.5
            state[f"{key}.alpha"] = torch.tensor(float(rank))
    return state


def write_lora(path: Path, **kwargs: Any) -> Path:
    """Write `lora_state_dict(**kwargs)` as a safetensors file and return its path."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(lora_state_dict(**kwargs), str(path))
    return path


def default_lora_file(variant: Variant) -> Path:
    """The tiny Lightning LoRA for `variant`, written once per machine to the temp folder."""
    path = Path(tempfile.gettempdir()) / "qwen-edit-worker-tiny" / f"{variant.name}-lightning.safetensors"
    if not path.is_file():
        partial = path.with_suffix(f".{os.getpid()}.partial")
        write_lora(partial)
        os.replace(partial, path)  # atomic: a concurrent reader never sees half a file
    return path
