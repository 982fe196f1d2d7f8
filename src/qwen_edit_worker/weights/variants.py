"""The model catalogue: which weights, pipeline class and Lightning LoRA each variant uses.

Why this exists: `MODEL_VARIANT` is one word chosen by the person deploying; everything that
follows from it (repos, the pipeline class, the LoRA file, the base model's usual steps and CFG,
whether multi-image input is allowed) lives here, in one table, so the worker, the bake script
and the docs cannot disagree.  Pure data: no torch, no diffusers.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Variant:
    """One deployable Qwen-Image-Edit variant."""

    name: str
    repo: str
    pipeline_class: str
    lora_repo: str
    lora_file: str
    max_images: int
    zero_cond_t: bool
    base_steps: int
    base_true_cfg_scale: float = 4.0
    lightning_steps: int = 3

    @property
    def lora_basename(self) -> str:
        return self.lora_file.rsplit("/", 1)[-1]


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant(
            name="edit",
            repo="Qwen/Qwen-Image-Edit",
            pipeline_class="QwenImageEditPipeline",
            lora_repo="lightx2v/Qwen-Image-Lightning",
            lora_file="Qwen-Image-Edit-Lightning-4steps-V1.0-bf16.safetensors",
            max_images=1,
            zero_cond_t=False,
            base_steps=50,
        ),
        Variant(
            name="edit-2509",
            repo="Qwen/Qwen-Image-Edit-2509",
            pipeline_class="QwenImageEditPlusPipeline",
            lora_repo="lightx2v/Qwen-Image-Lightning",
            lora_file="Qwen-Image-Edit-2509/Qwen-Image-Edit-2509-Lightning-4steps-V1.0-bf16.safetensors",
            max_images=3,
            zero_cond_t=False,
            base_steps=40,
        ),
        Variant(
            name="edit-2511",
            repo="Qwen/Qwen-Image-Edit-2511",
            pipeline_class="QwenImageEditPlusPipeline",
            lora_repo="lightx2v/Qwen-Image-Edit-2511-Lightning",
            lora_file="Qwen-Image-Edit-2511-Lightning-4steps-V1.0-bf16.safetensors",
            max_images=3,
            zero_cond_t=True,
            base_steps=40,
        ),
    )
}
DEFAULT_VARIANT = "edit-2511"
