"""The ComfyUI node classes this worker reads in a workflow, with their inputs and outputs.

Why this exists: an API-format graph is checked against one table before anything is walked, so
an unknown class, an unknown or missing input, or a value of the wrong type is a clean error that
names the node and the input.  Input names, kinds, options and bounds are ComfyUI's own, read from
its source (Comfy-Org/ComfyUI): nodes.py (KSampler, LoadImage, SaveImage, PreviewImage, VAEEncode,
VAEDecode, VAELoader, CLIPLoader, UNETLoader, LoraLoaderModelOnly, EmptyLatentImage),
comfy_extras/nodes_qwen.py (TextEncodeQwenImageEdit, TextEncodeQwenImageEditPlus),
comfy_extras/nodes_flux.py (FluxKontextImageScale, FluxKontextMultiReferenceLatentMethod),
comfy_extras/nodes_post_processing.py (ImageScaleToTotalPixels), comfy_extras/nodes_model_advanced.py
(ModelSamplingAuraFlow), comfy_extras/nodes_cfg.py (CFGNorm), comfy_extras/nodes_images.py
(SaveImageAdvanced; its DynamicCombo `format` is exported as `format`, `format.bit_depth`, ...),
comfy_extras/nodes_sd3.py (EmptySD3LatentImage), comfy_extras/nodes_primitive.py (Primitive*),
comfy_extras/nodes_string.py (StringConcatenate), comfy_extras/nodes_logic.py (ComfySwitchNode).
What each node means to this worker is interpret.py's business.  Pure data.
"""

from __future__ import annotations

from dataclasses import dataclass, field

LINK_KINDS = frozenset({"MODEL", "CLIP", "VAE", "CONDITIONING", "LATENT", "IMAGE", "MASK"})
VALUE_KINDS = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})
ANY = "*"  # ComfySwitchNode's MatchType: whatever its chosen input carries
MAX_RESOLUTION = 16384  # nodes.py
MAX_COMFY_SEED = 0xFFFFFFFFFFFFFFFF  # KSampler's seed bound in nodes.py


@dataclass(frozen=True)
class Input:
    """One input of a node class: a link kind (MODEL, IMAGE, ...) or a value kind (INT, COMBO, ...)."""

    kind: str
    required: bool = True
    low: float | None = None
    high: float | None = None
    options: tuple[str, ...] = ()  # COMBO: the allowed values; () means any file name ComfyUI would list


@dataclass(frozen=True)
class NodeClass:
    inputs: dict[str, Input]
    outputs: tuple[str, ...] = ()
    output_node: bool = False
    value: bool = False  # a node that only computes a value (primitives, switch, string concatenation)
    defaults: dict[str, object] = field(default_factory=dict)


def _i(kind: str, low: float | None = None, high: float | None = None, required: bool = True,
       options: tuple[str, ...] = ()) -> Input:
    return Input(kind, required, low, high, options)


def _opt(kind: str, low: float | None = None, high: float | None = None, options: tuple[str, ...] = ()) -> Input:
    return Input(kind, False, low, high, options)


_UPSCALE = ("nearest-exact", "bilinear", "area", "bicubic", "lanczos")
_SIDE = dict(low=16, high=MAX_RESOLUTION)

NODES: dict[str, NodeClass] = {
    "LoadImage": NodeClass({"image": _i("COMBO"), "upload": _opt("STRING")}, ("IMAGE", "MASK")),
    "SaveImage": NodeClass({"images": _i("IMAGE"), "filename_prefix": _opt("STRING")}, output_node=True,
                           defaults={"filename_prefix": "ComfyUI"}),
    "PreviewImage": NodeClass({"images": _i("IMAGE")}, output_node=True),
    "SaveImageAdvanced": NodeClass(
        {"images": _i("IMAGE"), "filename_prefix": _opt("STRING"),
         "format": _opt("COMBO", options=("png", "exr", "avif")), "format.bit_depth": _opt("COMBO"),
         "format.input_color_space": _opt("COMBO")}, ("IMAGE",), output_node=True,
        defaults={"filename_prefix": "ComfyUI", "format": "png", "format.bit_depth": "8-bit"}),
    "UNETLoader": NodeClass({"unet_name": _i("COMBO"), "weight_dtype": _i(
        "COMBO", options=("default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2"))}, ("MODEL",)),
    "CLIPLoader": NodeClass({"clip_name": _i("COMBO"), "type": _i("COMBO"), "device": _opt("COMBO", options=(
        "default", "cpu"))}, ("CLIP",)),
    "VAELoader": NodeClass({"vae_name": _i("COMBO")}, ("VAE",)),
    "LoraLoaderModelOnly": NodeClass({"model": _i("MODEL"), "lora_name": _i("COMBO"),
                                      "strength_model": _i("FLOAT", -100.0, 100.0)}, ("MODEL",)),
    "ModelSamplingAuraFlow": NodeClass({"model": _i("MODEL"), "shift": _i("FLOAT", 0.0, 100.0),
                                        "sampling": _opt("COMBO", options=("flow", "img_to_img_velocity"))},
                                       ("MODEL",), defaults={"sampling": "flow"}),
    "CFGNorm": NodeClass({"model": _i("MODEL"), "strength": _i("FLOAT", 0.0, 100.0), "pre_cfg": _opt("BOOLEAN")},
                         ("MODEL",)),
    "TextEncodeQwenImageEdit": NodeClass({"clip": _i("CLIP"), "prompt": _i("STRING"), "vae": _opt("VAE"),
                                          "image": _opt("IMAGE")}, ("CONDITIONING",)),
    "TextEncodeQwenImageEditPlus": NodeClass({"clip": _i("CLIP"), "prompt": _i("STRING"), "vae": _opt("VAE"),
                                              "image1": _opt("IMAGE"), "image2": _opt("IMAGE"),
                                              "image3": _opt("IMAGE")}, ("CONDITIONING",)),
    "FluxKontextMultiReferenceLatentMethod": NodeClass(
        {"conditioning": _i("CONDITIONING"),
         "reference_latents_method": _i("COMBO", options=("offset", "index", "uxo/uno", "index_timestep_zero"))},
        ("CONDITIONING",)),
    "FluxKontextImageScale": NodeClass({"image": _i("IMAGE")}, ("IMAGE",)),
    "ImageScaleToTotalPixels": NodeClass({"image": _i("IMAGE"), "upscale_method": _i("COMBO", options=_UPSCALE),
                                          "megapixels": _i("FLOAT", 0.01, 16.0),
                                          "resolution_steps": _opt("INT", 1, 256)},
                                         ("IMAGE",), defaults={"resolution_steps": 1}),
    "VAEEncode": NodeClass({"pixels": _i("IMAGE"), "vae": _i("VAE")}, ("LATENT",)),
    "VAEDecode": NodeClass({"samples": _i("LATENT"), "vae": _i("VAE")}, ("IMAGE",)),
    "KSampler": NodeClass({"model": _i("MODEL"), "seed": _i("INT", 0, MAX_COMFY_SEED), "steps": _i("INT", 1, 10000),
                           "cfg": _i("FLOAT", 0.0, 100.0), "sampler_name": _i("COMBO"), "scheduler": _i("COMBO"),
                           "positive": _i("CONDITIONING"), "negative": _i("CONDITIONING"),
                           "latent_image": _i("LATENT"), "denoise": _i("FLOAT", 0.0, 1.0)}, ("LATENT",)),
    "EmptySD3LatentImage": NodeClass({"width": _i("INT", **_SIDE), "height": _i("INT", **_SIDE),
                                      "batch_size": _i("INT", 1, 4096)}, ("LATENT",)),
    "EmptyLatentImage": NodeClass({"width": _i("INT", **_SIDE), "height": _i("INT", **_SIDE),
                                   "batch_size": _i("INT", 1, 4096)}, ("LATENT",)),
    "PrimitiveInt": NodeClass({"value": _i("INT")}, ("INT",), value=True),
    "PrimitiveFloat": NodeClass({"value": _i("FLOAT")}, ("FLOAT",), value=True),
    "PrimitiveBoolean": NodeClass({"value": _i("BOOLEAN")}, ("BOOLEAN",), value=True),
    "PrimitiveString": NodeClass({"value": _i("STRING")}, ("STRING",), value=True),
    "PrimitiveStringMultiline": NodeClass({"value": _i("STRING")}, ("STRING",), value=True),
    "StringConcatenate": NodeClass({"string_a": _i("STRING"), "string_b": _i("STRING"), "delimiter": _opt("STRING")},
                                   ("STRING",), value=True, defaults={"delimiter": ""}),
    "ComfySwitchNode": NodeClass({"switch": _i("BOOLEAN"), "on_false": _opt(ANY), "on_true": _opt(ANY)}, (ANY,),
                                 value=True),
}
OUTPUT_CLASSES = tuple(name for name, spec in NODES.items() if spec.output_node)
