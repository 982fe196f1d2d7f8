"""An API-format ComfyUI graph, checked against the node table, and the two ways to read it.

Why this exists: `input.workflow` is `{"<node id>": {"class_type", "inputs", "_meta"}}` as ComfyUI's
"Export (API)" writes it, with links as `[<node id>, <output slot>]`.  `Graph.parse` checks every
node once (a known class, known inputs, the required ones present, literals of the right type and
within ComfyUI's bounds, links to existing outputs of the right kind) so everything after it can
trust the shape.  Then `source` follows a link input to the node that feeds it and `value` reads a
value input, both through ComfySwitchNode (its `switch` decides, as ComfyUI's lazy switch does) and
value nodes (Primitive*, StringConcatenate).  Errors name `input.workflow.<id>.inputs.<name>`.  Pure.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import RequestError, describe
from .nodes import ANY, LINK_KINDS, NODES, Input, NodeClass

NODE_KEYS = ("class_type", "inputs", "_meta")
MAX_DEPTH = 64  # longer chains than any Qwen edit graph; a cycle stops here


@dataclass(frozen=True)
class Node:
    id: str
    class_type: str
    inputs: Mapping[str, Any]
    spec: NodeClass

    def field(self, name: str | None = None) -> str:
        return f"input.workflow.{self.id}" + (f".inputs.{name}" if name else "")

    def label(self) -> str:
        return f"{self.class_type} {self.id}"


def is_link(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and \
        isinstance(value[1], int) and not isinstance(value[1], bool)


class Graph:
    """A checked graph; build it with `Graph.parse`."""

    def __init__(self, nodes: dict[str, Node]) -> None:
        self.nodes = nodes

    @classmethod
    def parse(cls, raw: Any) -> Graph:
        if isinstance(raw, Mapping) and isinstance(raw.get("nodes"), list) and "links" in raw:
            raise RequestError("input.workflow", 'this is ComfyUI\'s UI format (nodes and links); export the workflow '
                                                 'with Workflow > Export (API) and send that')
        if not isinstance(raw, Mapping) or not raw:
            raise RequestError("input.workflow", f"must be a ComfyUI API-format graph, an object of nodes "
                                                 f'{{"<id>": {{"class_type", "inputs"}}}} (got {describe(raw)})')
        nodes = {}
        for node_id, body in raw.items():
            where = f"input.workflow.{node_id}"
            if not isinstance(body, Mapping) or not isinstance(body.get("class_type"), str):
                raise RequestError(where, 'must be a node {"class_type": "...", "inputs": {...}}')
            extra = sorted(str(k) for k in body if k not in NODE_KEYS)
            if extra:
                raise RequestError(where, f"unknown field(s) {', '.join(extra)}; a node has {', '.join(NODE_KEYS)}")
            kind = body["class_type"]
            if kind not in NODES:
                raise RequestError(f"{where}.class_type", f"{describe(kind)} is not a node this worker interprets; it "
                                                          f"reads the Qwen-Image-Edit node set: {', '.join(NODES)}")
            inputs = body.get("inputs", {})
            if not isinstance(inputs, Mapping):
                raise RequestError(f"{where}.inputs", "must be an object of input names to values or links")
            nodes[str(node_id)] = Node(str(node_id), kind, inputs, NODES[kind])
        graph = cls(nodes)
        for node in nodes.values():
            graph._check(node)
        return graph

    def _check(self, node: Node) -> None:
        spec = node.spec
        for name, value in node.inputs.items():
            if name not in spec.inputs:
                raise RequestError(node.field(name), f"{node.class_type} has no input {name!r}; it takes "
                                                     f"{', '.join(spec.inputs)}")
            wanted = spec.inputs[name]
            if is_link(value):
                self._check_link(node, name, wanted, value)
            elif wanted.kind in LINK_KINDS or wanted.kind == ANY:
                raise RequestError(node.field(name), f"must be a link [node id, output slot] to a {wanted.kind} "
                                                     f"output (got {describe(value)})")
            else:
                check_literal(node.field(name), wanted, value)
        for name, wanted in spec.inputs.items():
            if wanted.required and name not in node.inputs:
                needs = f"a link to a {wanted.kind}" if wanted.kind in LINK_KINDS else wanted.kind.lower()
                raise RequestError(node.field(name), f"required: {node.class_type} needs {name} ({needs})")

    def _check_link(self, node: Node, name: str, wanted: Input, value: list[Any]) -> None:
        target = self.nodes.get(value[0])
        if target is None:
            raise RequestError(node.field(name), f"links to node {value[0]!r}, which is not in the workflow")
        outputs = target.spec.outputs
        if not 0 <= value[1] < len(outputs):
            raise RequestError(node.field(name), f"links to output {value[1]} of {target.label()}, which has "
                               f"{len(outputs)} output(s)")
        given = outputs[value[1]]
        fits = given == wanted.kind or ANY in (given, wanted.kind) or (wanted.kind == "COMBO" and given == "STRING")
        if not fits:
            raise RequestError(node.field(name), f"needs a {wanted.kind}, and output {value[1]} of {target.label()} "
                                                 f"is a {given}")

    # -- reading -------------------------------------------------------------------------------------

    def source(self, node: Node, name: str, depth: int = 0) -> Node | None:
        """The node whose output feeds link input `name` (through switches); None when not connected."""
        value = node.inputs.get(name)
        if value is None:
            return None
        target = self.nodes[value[0]]
        if target.class_type == "ComfySwitchNode":
            return self.source(target, self._branch(target, depth), depth + 1)
        return target

    def value(self, node: Node, name: str, depth: int = 0) -> Any:
        """The value input `name` carries: its literal, a value node's result, or the class default."""
        if depth > MAX_DEPTH:
            raise RequestError(node.field(name), "the values form a cycle or a chain too long to follow")
        raw = node.inputs.get(name, node.spec.defaults.get(name))
        if not is_link(raw):
            return raw
        target = self.nodes[raw[0]]
        if target.class_type == "ComfySwitchNode":
            result = self.value(target, self._branch(target, depth), depth + 1)
        elif target.class_type == "StringConcatenate":
            result = str(self.value(target, "delimiter", depth + 1)).join(
                (str(self.value(target, "string_a", depth + 1)), str(self.value(target, "string_b", depth + 1))))
        elif target.spec.value:
            result = self.value(target, "value", depth + 1)
        else:
            raise RequestError(node.field(name), f"must be a value (a literal or a Primitive, switch or string "
                                                 f"node), not the output of {target.label()}")
        check_literal(node.field(name), node.spec.inputs.get(name, Input(ANY)), result)
        return result

    def _branch(self, switch: Node, depth: int) -> str:
        if depth > MAX_DEPTH:
            raise RequestError(switch.field(), "the switches form a cycle or a chain too long to follow")
        branch = "on_true" if self.value(switch, "switch", depth + 1) else "on_false"
        if branch not in switch.inputs:
            raise RequestError(switch.field(branch), f"required: the switch is {branch == 'on_true'} and nothing is "
                                                     f"connected to {branch}")
        return branch


def check_literal(field: str, wanted: Input, value: Any) -> None:
    """A literal value against its input's kind, options and ComfyUI bounds."""
    kind = wanted.kind
    ok = {
        "INT": isinstance(value, int) and not isinstance(value, bool),
        "FLOAT": isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
        "STRING": isinstance(value, str),
        "COMBO": isinstance(value, str),
        "BOOLEAN": isinstance(value, bool),
    }.get(kind, True)
    if not ok:
        noun = {"INT": "a whole number", "FLOAT": "a number", "STRING": "a string", "COMBO": "a string",
                "BOOLEAN": "true or false"}[kind]
        raise RequestError(field, f"must be {noun} (got {describe(value)})")
    if wanted.options and value not in wanted.options:
        raise RequestError(field, f"must be one of {', '.join(wanted.options)} (got {describe(value)})")
    if kind in ("INT", "FLOAT") and wanted.low is not None and wanted.high is not None \
            and not wanted.low <= value <= wanted.high:
        raise RequestError(field, f"must be from {number(wanted.low)} to {number(wanted.high)} (got {describe(value)})")


def number(value: float) -> str:
    """A bound as ComfyUI's source writes it: whole numbers without a decimal point."""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"
