"""Flatten a ComfyUI workflow in the UI format (nodes, links, subgraphs) to the API format.

Why this exists: ComfyUI's templates ship in the UI format; worker-comfyui (and this worker's
`input.workflow`) take what ComfyUI's "Export (API)" writes.  This script does what the frontend's
`graphToPrompt` does (comfyui-frontend-package 1.58.1, litegraph's ExecutableNodeDTO): every node
that is not virtual (notes, Reroute, the legacy PrimitiveNode) nor muted (mode 2) nor bypassed
(mode 4) becomes `{"class_type", "inputs", "_meta": {"title"}}`; nodes inside a subgraph get the
id `<subgraph node id>:<inner id>`; widget values are named (the `control_after_generate` widget
is not serialised); links are resolved through subgraph boundaries, reroutes and bypassed nodes
to `[origin id, slot]`; a promoted subgraph input left unconnected takes the subgraph node's own
widget value when it stores one, else the inner widget's; links to nodes left out are dropped.

    python tests/comfy_templates/flatten.py TEMPLATES_DIR OUT_DIR   # rewrites the fixtures
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

# Widget names in widgets_values order, per class (None: a widget the API format does not carry).
WIDGETS: dict[str, list[str | None]] = {
    "LoadImage": ["image", None],  # the upload button is not a value
    "SaveImage": ["filename_prefix"],
    "PreviewImage": [],
    "SaveImageAdvanced": ["filename_prefix", "format", "format.bit_depth", "format.input_color_space"],
    "ImageScaleToTotalPixels": ["upscale_method", "megapixels", "resolution_steps"],
    "FluxKontextImageScale": [],
    "FluxKontextMultiReferenceLatentMethod": ["reference_latents_method"],
    "CFGNorm": ["strength", "pre_cfg"],
    "ModelSamplingAuraFlow": ["shift"],
    "VAELoader": ["vae_name"],
    "CLIPLoader": ["clip_name", "type", "device"],
    "UNETLoader": ["unet_name", "weight_dtype"],
    "LoraLoaderModelOnly": ["lora_name", "strength_model"],
    "TextEncodeQwenImageEdit": ["prompt"],
    "TextEncodeQwenImageEditPlus": ["prompt"],
    "VAEEncode": [],
    "VAEDecode": [],
    "KSampler": ["seed", None, "steps", "cfg", "sampler_name", "scheduler", "denoise"],
    "EmptySD3LatentImage": ["width", "height", "batch_size"],
    "EmptyLatentImage": ["width", "height", "batch_size"],
    "PrimitiveInt": ["value", None],
    "PrimitiveFloat": ["value"],
    "PrimitiveBoolean": ["value"],
    "PrimitiveString": ["value"],
    "PrimitiveStringMultiline": ["value"],
    "ComfySwitchNode": ["switch"],
    "StringConcatenate": ["string_a", "string_b", "delimiter"],
}
VIRTUAL = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
MUTED, BYPASSED = 2, 4
SUBGRAPH_INPUT, SUBGRAPH_OUTPUT = -10, -20


class Scope:
    """One graph level: the top-level workflow or one subgraph instance."""

    def __init__(self, graph: dict[str, Any], path: list[str], instance: dict[str, Any] | None,
                 parent: Scope | None) -> None:
        self.graph, self.path, self.instance, self.parent = graph, path, instance, parent
        self.nodes = {node["id"]: node for node in graph["nodes"]}
        self.links = {link["id"] if isinstance(link, dict) else link[0]: _link(link) for link in graph["links"]}


def _link(link: Any) -> dict[str, Any]:
    if isinstance(link, dict):
        return link
    keys = ("id", "origin_id", "origin_slot", "target_id", "target_slot", "type")
    return dict(zip(keys, link, strict=False))


def flatten(workflow: dict[str, Any]) -> dict[str, Any]:
    subgraphs = {sg["id"]: sg for sg in workflow.get("definitions", {}).get("subgraphs", [])}
    out: dict[str, Any] = {}
    _emit(Scope(workflow, [], None, None), subgraphs, out)
    for node in out.values():  # the frontend drops links to nodes it left out
        node["inputs"] = {k: v for k, v in node["inputs"].items()
                          if not (isinstance(v, list) and len(v) == 2 and v[0] not in out)}
    return out


def _emit(scope: Scope, subgraphs: dict[str, Any], out: dict[str, Any]) -> None:
    for node in scope.graph["nodes"]:
        kind = node["type"]
        if kind in VIRTUAL or node.get("mode", 0) in (MUTED, BYPASSED):
            continue
        node_id = ":".join([*scope.path, str(node["id"])])
        if kind in subgraphs:
            _emit(Scope(subgraphs[kind], [*scope.path, str(node["id"])], node, scope), subgraphs, out)
            continue
        names = WIDGETS[kind]
        values = node.get("widgets_values") or []
        inputs: dict[str, Any] = {name: value for name, value in zip(names, values, strict=False) if name}
        for slot in node.get("inputs", []):
            if slot.get("link") is None:
                continue
            resolved = _resolve_link(scope, scope.links[slot["link"]], subgraphs)
            if resolved is not None:
                inputs[slot["name"]] = resolved[1] if resolved[0] == "value" else [resolved[1], resolved[2]]
        out[node_id] = {"inputs": inputs, "class_type": kind, "_meta": {"title": node.get("title") or kind}}


def _resolve_link(scope: Scope, link: dict[str, Any], subgraphs: dict[str, Any]) -> tuple[Any, ...] | None:
    return _resolve(scope, link["origin_id"], link["origin_slot"], link.get("type"), subgraphs)


def _resolve(scope: Scope, origin: int, slot: int, kind: Any, subgraphs: dict[str, Any]) -> tuple[Any, ...] | None:
    if origin == SUBGRAPH_INPUT:  # out through the subgraph node's input of the same name
        assert scope.instance is not None and scope.parent is not None
        sub_input = scope.graph["inputs"][slot]
        outer = next((i for i in scope.instance.get("inputs", []) if i["name"] == sub_input["name"]), None)
        if outer is not None and outer.get("link") is not None:
            return _resolve_link(scope.parent, scope.parent.links[outer["link"]], subgraphs)
        stored = scope.instance.get("widgets_values") or []
        widget_inputs = [i["name"] for i in scope.graph["inputs"] if i.get("type") in WIDGET_TYPES]
        if stored and sub_input["name"] in widget_inputs:
            return ("value", stored[widget_inputs.index(sub_input["name"])])
        return None  # the inner widget keeps its own value
    node = scope.nodes[origin]
    if node["type"] in subgraphs:  # into the subgraph, to what feeds its output slot
        inner = Scope(subgraphs[node["type"]], [*scope.path, str(origin)], node, scope)
        link_id = inner.graph["outputs"][slot]["linkIds"][0]
        return _resolve_link(inner, inner.links[link_id], subgraphs)
    mode = node.get("mode", 0)
    if mode == MUTED:
        return None
    if node["type"] == "PrimitiveNode":
        return ("value", node["widgets_values"][0])
    if node["type"] == "Reroute" or mode == BYPASSED:
        inputs = node.get("inputs", [])
        match = [i for i in inputs if i.get("type") == kind] if mode == BYPASSED else inputs
        if not match or match[0].get("link") is None:
            return None
        return _resolve_link(scope, scope.links[match[0]["link"]], subgraphs)
    return ("link", ":".join([*scope.path, str(origin)]), slot)


def main(argv: list[str]) -> int:
    source, target = Path(argv[0]), Path(argv[1])
    for name in argv[2:] or sorted(p.name for p in source.glob("*.json")):
        api = flatten(json.loads((source / name).read_text()))
        (target / name).write_text(json.dumps(api, indent=1, sort_keys=True, ensure_ascii=False) + "\n")
        print(f"{name}: {len(api)} nodes")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
