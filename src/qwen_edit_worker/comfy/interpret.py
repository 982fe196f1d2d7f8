"""Walk a Qwen-Image-Edit graph back from its output and read it as one edit job.

Why this exists: the worker does not execute ComfyUI nodes; it reads what they ask for.  From the
output node (SaveImage, SaveImageAdvanced or PreviewImage) back through VAEDecode to the one
KSampler: its seed, steps, cfg, the model chain (UNETLoader, LoRAs, ModelSamplingAuraFlow, CFGNorm),
the positive and negative TextEncodeQwenImageEdit(Plus) prompts and their pictures (LoadImage, through
FluxKontextImageScale or ImageScaleToTotalPixels), and the latent that sets the working size.
Where the graph asks for something this worker does not run, the answer is an error naming the node
input and what this worker runs; where only ComfyUI-side configuration differs, a warning.  Pure.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import RequestError
from . import files, resolution
from .deployment import Deployment
from .graph import Graph, Node
from .nodes import OUTPUT_CLASSES

SAMPLER, SCHEDULER = "euler", "simple"  # diffusers' FlowMatchEulerDiscreteScheduler: Euler, one sigma per step
LIGHTNING_SHIFT = 3.0  # the Lightning scheduler's exponential time shift, mu = log(3) (facts.md section 3)
ENCODERS = ("TextEncodeQwenImageEdit", "TextEncodeQwenImageEditPlus")
SCALERS = ("FluxKontextImageScale", "ImageScaleToTotalPixels")


@dataclass(frozen=True)
class Scaler:
    node: Node
    megapixels: float | None  # ImageScaleToTotalPixels; None: FluxKontextImageScale
    steps: int = 1

    @property
    def field(self) -> str:
        return self.node.field("megapixels" if self.megapixels is not None else "image")


@dataclass(frozen=True)
class Picture:
    """A picture as a node input sees it: a LoadImage's file, then the scalers in the order they run."""

    load: Node
    scalers: tuple[Scaler, ...]

    @property
    def name(self) -> str:
        return str(self.load.inputs["image"])


@dataclass
class Plan:
    sampler: Node
    pictures: list[Picture]
    prompt: tuple[str, str]  # (text, the field it came from)
    negative: tuple[str, str]
    seed: int
    steps: int
    cfg: float
    latent: Node  # VAEEncode or an empty-latent node
    latent_picture: Picture | None  # VAEEncode's pixels
    latent_size: tuple[int, int, int] | None  # an empty latent's width, height, batch_size
    loras: list[tuple[Node, str, float]] = field(default_factory=list)  # request LoRAs: node, path, scale
    outputs: list[tuple[Node, str]] = field(default_factory=list)  # returned output nodes and their prefixes
    warnings: list[str] = field(default_factory=list)


def interpret(graph: Graph, deploy: Deployment) -> Plan:
    outputs = [n for n in graph.nodes.values() if n.class_type in OUTPUT_CLASSES]
    if not outputs:
        raise RequestError("input.workflow", f"has no output node: add one of {', '.join(OUTPUT_CLASSES)} fed by "
                                             "the edit's VAEDecode")
    samplers: dict[str, Node] = {}
    for out in outputs:
        decode = _expect(graph, out, "images", ("VAEDecode",), "the decoded edit, as is")
        _vae(graph, decode, "vae")
        sampler = _expect(graph, decode, "samples", ("KSampler",), "the edit's sampler")
        samplers[sampler.id] = sampler
    if len(samplers) > 1:
        raise RequestError("input.workflow", f"holds {len(samplers)} edits (KSampler {', '.join(sorted(samplers))}); "
                                             "this worker runs one edit per job: send one graph each")
    sampler = next(iter(samplers.values()))
    saves = [o for o in outputs if o.class_type != "PreviewImage"]
    plan = _sampler(graph, sampler, deploy)
    plan.outputs = [(node, _prefix(graph, node)) for node in sorted(saves or outputs, key=lambda n: n.id)]
    plan.warnings = list(dict.fromkeys(plan.warnings))  # both prompts' loaders say the same
    if not saves:
        plan.warnings.append("the workflow's only output is PreviewImage, whose pictures worker-comfyui leaves out; "
                             "this worker returns them")
    return plan


def _sampler(graph: Graph, ks: Node, deploy: Deployment) -> Plan:
    for name, wanted in (("sampler_name", SAMPLER), ("scheduler", SCHEDULER)):
        if graph.value(ks, name) != wanted:
            raise RequestError(ks.field(name), f"this worker samples with {SAMPLER} and the {SCHEDULER} scheduler "
                                               f"(diffusers' flow-matching Euler); got {graph.value(ks, name)!r}")
    if graph.value(ks, "denoise") != 1:
        raise RequestError(ks.field("denoise"), "must be 1: this worker edits from noise, as Qwen-Image-Edit's own "
                                                "workflows do (a partial denoise of the input latent is not run)")
    cfg = float(graph.value(ks, "cfg"))
    if cfg < 1:
        raise RequestError(ks.field("cfg"), f"must be 1 (no CFG) or above with a negative prompt (got {cfg:g})")
    warnings: list[str] = []
    loras = _model(graph, ks, deploy, warnings)
    positive, pictures, method = _conditioning(graph, ks, "positive", deploy, warnings)
    negative, negative_pictures, _ = _conditioning(graph, ks, "negative", deploy, warnings)
    if [p.name for p in negative_pictures] != [p.name for p in pictures]:
        raise RequestError(ks.field("negative"), "the negative prompt's pictures must be the positive's, in the same "
                                                 "order: this worker encodes both prompts with the same pictures")
    if deploy.variant.zero_cond_t and method is None:
        warnings.append(f"{ks.field('positive')}: no FluxKontextMultiReferenceLatentMethod; this worker's "
                        f"{deploy.variant.name} runs index_timestep_zero (diffusers' zero_cond_t) regardless")
    latent = _expect(graph, ks, "latent_image", ("VAEEncode", "EmptySD3LatentImage", "EmptyLatentImage"),
                     "the latent whose size is the edit's")
    latent_picture, latent_size = None, None
    if latent.class_type == "VAEEncode":
        _vae(graph, latent, "vae")
        latent_picture = _picture(graph, latent, "pixels")
    else:
        latent_size = (graph.value(latent, "width"), graph.value(latent, "height"), graph.value(latent, "batch_size"))
    return Plan(ks, pictures, positive, negative, int(graph.value(ks, "seed")), int(graph.value(ks, "steps")), cfg,
                latent, latent_picture, latent_size, loras, warnings=warnings)


def _model(graph: Graph, ks: Node, deploy: Deployment, warnings: list[str]) -> list[tuple[Node, str, float]]:
    loras, lightning, seen, visited = [], None, set(), set()
    node = _expect(graph, ks, "model", None, "")
    while node.class_type != "UNETLoader":
        if node.id in visited:
            raise RequestError(node.field("model"), "the model chain forms a cycle")
        visited.add(node.id)
        if node.class_type in seen and node.class_type != "LoraLoaderModelOnly":
            raise RequestError(node.field(), f"a second {node.class_type} on the model: this worker applies one")
        seen.add(node.class_type)
        if node.class_type == "LoraLoaderModelOnly":
            if files.is_lightning(graph, node, deploy):
                lightning = node
            else:
                loras.append((node, files.lora_path(graph, node, deploy), float(graph.value(node, "strength_model"))))
        elif node.class_type == "ModelSamplingAuraFlow":
            _shift(graph, node, deploy, warnings)
        elif node.class_type == "CFGNorm":
            if graph.value(node, "strength") != 1:
                raise RequestError(node.field("strength"), "must be 1: this worker's CFG rescales the guided "
                                                           "prediction to the conditional one's norm, at full strength")
        else:
            raise RequestError(node.field(), f"{node.class_type} does not configure a Qwen-Image-Edit model; the "
                               "model chain takes UNETLoader, LoraLoaderModelOnly, ModelSamplingAuraFlow and CFGNorm")
        node = _expect(graph, node, "model", None, "")
    files.check_unet(graph, node, deploy, warnings)
    if deploy.lightning and lightning is None:
        raise RequestError(ks.field("model"), f"the model reaching this KSampler has no Lightning LoRA, and this "
                           f"worker runs with {deploy.lightning_names[0]} fused (LIGHTNING=1): add it with "
                           "LoraLoaderModelOnly at strength 1 (in ComfyUI's templates: enable_turbo_mode true), or "
                           "send the workflow to a LIGHTNING=0 worker")
    return loras


def _shift(graph: Graph, node: Node, deploy: Deployment, warnings: list[str]) -> None:
    if graph.value(node, "sampling") != "flow":
        raise RequestError(node.field("sampling"), "must be flow: this worker runs flow matching")
    shift = float(graph.value(node, "shift"))
    if deploy.lightning and shift != LIGHTNING_SHIFT:
        warnings.append(f"{node.field('shift')}: {shift:g} asked; this worker's Lightning scheduler shifts by "
                        f"{LIGHTNING_SHIFT:g} (exponential time shift, mu = log 3)")
    elif not deploy.lightning:
        warnings.append(f"{node.field('shift')}: {shift:g} asked; this worker's base-model scheduler sets its shift "
                        "from the image size (diffusers' dynamic shifting)")


def _conditioning(graph: Graph, ks: Node, name: str, deploy: Deployment,
                  warnings: list[str]) -> tuple[tuple[str, str], list[Picture], str | None]:
    node, method = _expect(graph, ks, name, ENCODERS + ("FluxKontextMultiReferenceLatentMethod",), "a prompt"), None
    if node.class_type == "FluxKontextMultiReferenceLatentMethod":
        method = graph.value(node, "reference_latents_method")
        runs = "index_timestep_zero" if deploy.variant.zero_cond_t else "index"
        if method != runs:
            raise RequestError(node.field("reference_latents_method"), f"this worker's {deploy.variant.name} places "
                               f"reference pictures as {runs!r} (got {method!r})")
        node = _expect(graph, node, "conditioning", ENCODERS, "a prompt")
    plus = node.class_type == "TextEncodeQwenImageEditPlus"
    if plus != (deploy.variant.max_images > 1):
        warnings.append(f"{node.field()}: {node.class_type}; this worker's {deploy.variant.name} encodes prompts as "
                        f"{deploy.variant.pipeline_class} does")
    _expect(graph, node, "clip", ("CLIPLoader",), "the text encoder")
    files.check_clip(graph, graph.source(node, "clip"), deploy, warnings)  # type: ignore[arg-type]
    if node.inputs.get("vae") is None:
        raise RequestError(node.field("vae"), "required here: this worker always conditions on the pictures' latents")
    _vae(graph, node, "vae")
    slots = ("image1", "image2", "image3") if plus else ("image",)
    pictures = [_picture(graph, node, slot) for slot in slots if node.inputs.get(slot) is not None]
    if not pictures:
        raise RequestError(node.field(slots[0]), "required: this worker edits pictures (connect a LoadImage)")
    if len(pictures) > deploy.variant.max_images:
        raise RequestError(node.field(slots[deploy.variant.max_images]), f"this worker's {deploy.variant.name} takes "
                           f"{deploy.variant.max_images} picture(s); several need edit-2509 or edit-2511")
    return (str(graph.value(node, "prompt")), node.field("prompt")), pictures, method


def _picture(graph: Graph, node: Node, name: str) -> Picture:
    scalers: list[Scaler] = []
    current = _expect(graph, node, name, ("LoadImage", *SCALERS), "a picture")
    for _ in range(64):
        if current.class_type == "LoadImage":
            return Picture(current, tuple(reversed(scalers)))
        total = current.class_type == "ImageScaleToTotalPixels"
        scalers.append(Scaler(current, float(graph.value(current, "megapixels")) if total else None,
                              int(graph.value(current, "resolution_steps")) if total else 1))
        current = _expect(graph, current, "image", ("LoadImage", *SCALERS), "a picture")
    raise RequestError(node.field(name), "the picture's scalers form a cycle or a chain too long to follow")


def _prefix(graph: Graph, node: Node) -> str:
    if node.class_type == "SaveImageAdvanced":
        for name, runs in (("format", "png"), ("format.bit_depth", "8-bit")):
            if graph.value(node, name) != runs:
                raise RequestError(node.field(name), f"this worker writes 8-bit PNG (got {graph.value(node, name)!r})")
    if node.class_type == "PreviewImage":
        return "ComfyUI"
    prefix = str(graph.value(node, "filename_prefix"))
    problem = resolution.prefix_problem(prefix)
    if problem:
        raise RequestError(node.field("filename_prefix"), problem)
    return prefix


def _vae(graph: Graph, node: Node, name: str) -> None:
    vae = _expect(graph, node, name, ("VAELoader",), "the VAE")
    if "qwen_image_vae" not in files.normal(str(graph.value(vae, "vae_name"))):
        raise RequestError(vae.field("vae_name"), "must be Qwen-Image's VAE (qwen_image_vae.safetensors): this "
                                                  "worker decodes with its model's own")


def _expect(graph: Graph, node: Node, name: str, classes: tuple[str, ...] | None, what: str) -> Node:
    source = graph.source(node, name)
    if source is None:
        raise RequestError(node.field(name), f"required: {node.class_type} needs it connected")
    if classes is not None and source.class_type not in classes:
        raise RequestError(node.field(name), f"must come from {' or '.join(classes)} ({what}); it comes from "
                                             f"{source.label()}")
    return source
