"""The model files a workflow names (UNETLoader, CLIPLoader, LoraLoaderModelOnly), read as this worker's.

Why this exists: a ComfyUI graph loads weights by file name from ComfyUI's folders; this worker has
its own baked weights and its fused Lightning LoRA.  A name is recognised for what it is: the
variant a UNET file is (ComfyUI's repackaged names: qwen_image_edit[_2509|_2511]_<precision>),
the text encoder and its precision, the Lightning LoRA by its published file names (fused here),
and any other LoRA as a URL, a Hugging Face path or a LORA_DIR name for `input.loras`.  A name that
contradicts the worker is an error naming the node input; a ComfyUI-side precision choice, a warning.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from ..errors import RequestError, describe
from .deployment import Deployment
from .graph import Graph, Node

PRECISION_TOKENS = ("fp8", "int8", "bf16", "fp16", "fp32")  # as they appear in ComfyUI's file names
UNET_VARIANTS = (("qwen_image_edit_2511", "edit-2511"), ("qwen_image_edit_2509", "edit-2509"),
                 ("qwen_image_edit", "edit"))


def normal(name: str) -> str:
    """Lower case with '-' and spaces as '_', so Qwen-Image-Edit-2509 and qwen_image_edit_2509 match."""
    return name.lower().replace("-", "_").replace(" ", "_")


def lightning_names(basenames: list[str]) -> tuple[str, ...]:
    """The fused Lightning LoRA's file names: the variant's published file, and LORA_PATH's."""
    return tuple({name.lower(): name for name in reversed(basenames) if name}.values())[::-1]


def basename(path: str) -> str:
    tail = urlsplit(path).path if "://" in path else path
    return tail.rstrip("/").rsplit("/", 1)[-1]


def is_lightning(graph: Graph, node: Node, deploy: Deployment) -> bool:
    """True when this LoraLoaderModelOnly is the fused Lightning LoRA; an error when it names another one."""
    name = str(graph.value(node, "lora_name"))
    base = basename(name).lower()
    if base in (known.lower() for known in deploy.lightning_names):
        if not deploy.lightning:
            raise RequestError(node.field("lora_name"), "this worker runs the base model without the Lightning LoRA "
                               "(LIGHTNING=0): remove this node (enable_turbo_mode false in ComfyUI's templates) or "
                               "send the workflow to a Lightning worker")
        if graph.value(node, "strength_model") != 1:
            raise RequestError(node.field("strength_model"), "must be 1: the Lightning LoRA is fused into this "
                                                             "worker's model at strength 1")
        return True
    if "lightning" in base:
        raise RequestError(node.field("lora_name"), f"{describe(name, 80)} is not the Lightning LoRA this worker has: "
                           f"it runs {deploy.lightning_names[0]} fused (LORA_PATH)")
    return False


def lora_path(graph: Graph, node: Node, deploy: Deployment) -> str:
    """The `input.loras` path of a LoRA that is not the Lightning one: a URL, ORG/NAME/FILE or a LORA_DIR name."""
    name = str(graph.value(node, "lora_name")).strip()
    if "://" in name or "/" in name or deploy.lora_dir:
        return name
    raise RequestError(node.field("lora_name"), f"{describe(name, 80)} is a file in ComfyUI's loras folder, which "
                       "this worker does not have: name the LoRA by an https URL or a Hugging Face "
                       "ORG/NAME/FILE.safetensors path (or deploy with LORA_DIR holding it); "
                       f"{deploy.lightning_names[0]} is the fused Lightning LoRA")


def check_unet(graph: Graph, node: Node, deploy: Deployment, warnings: list[str]) -> None:
    name = str(graph.value(node, "unet_name"))
    found = next((variant for key, variant in UNET_VARIANTS if key in normal(name)), None)
    if found != deploy.variant.name:
        named = f"is {found}'s model" if found else "is not a Qwen-Image-Edit model this worker knows"
        raise RequestError(node.field("unet_name"), f"{describe(name, 80)} {named}; this worker serves "
                           f"{deploy.variant.repo} (MODEL_VARIANT={deploy.variant.name}), e.g. "
                           f"{deploy.variant.repo.split('/')[1].lower().replace('-', '_')}_bf16.safetensors")
    _precision(node.field("unet_name"), name, deploy.precision, "PRECISION", warnings)
    dtype = graph.value(node, "weight_dtype")
    if dtype != "default":
        warnings.append(f"{node.field('weight_dtype')}: {dtype} is ComfyUI's; this worker runs its transformer at "
                        f"PRECISION={deploy.precision} (model.precision says what ran)")


def check_clip(graph: Graph, node: Node, deploy: Deployment, warnings: list[str]) -> None:
    if graph.value(node, "type") != "qwen_image":
        raise RequestError(node.field("type"), "must be qwen_image: this worker's text encoder is Qwen2.5-VL 7B")
    name = str(graph.value(node, "clip_name"))
    if "qwen_2.5_vl" not in normal(name) and "qwen2.5_vl" not in normal(name):
        raise RequestError(node.field("clip_name"), f"{describe(name, 80)} is not Qwen2.5-VL: this worker encodes "
                                                    "prompts with its model's own Qwen2.5-VL 7B")
    _precision(node.field("clip_name"), name, deploy.text_encoder_precision, "TEXT_ENCODER_PRECISION", warnings)


def _precision(field: str, name: str, runs: str, setting: str, warnings: list[str]) -> None:
    token = next((t for t in PRECISION_TOKENS if t in normal(name)), None)
    if token is not None and runs != "auto" and token != runs:
        warnings.append(f"{field}: the {token} file is ComfyUI's; this worker runs its own weights at "
                        f"{setting}={runs}")
