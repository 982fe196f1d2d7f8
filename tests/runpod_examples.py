"""RunPod's public Qwen edit endpoints' docs examples (runpod_examples.json, verbatim) and a loopback
server for what their URLs point at: shared by test_runpod_requests.py and test_deployed.py."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from conftest import encode_picture, picture
from lora_files import FileServer, Route, lora_bytes

EXAMPLES = {name: body for name, body in json.loads(
    (Path(__file__).parent / "runpod_examples.json").read_text()).items() if not name.startswith("_")}
VARIANT_OF = {"qwen-image-edit": "edit", "qwen-image-edit-2511": "edit-2511", "qwen-image-edit-2511-lora": "edit-2511"}
LISTED_SIZES = ("1024*1024", "1024*1280", "1280*1024", "1280*1280", "1280*1536", "1536*1080")  # their docs' options
INPUT = picture(96, 64, seed=21)  # what the example URLs serve here


def example(name: str) -> dict[str, Any]:
    """A fresh copy of one docs example, as sent."""
    return copy.deepcopy(EXAMPLES[name])


def served(body: dict[str, Any], url: str) -> dict[str, Any]:
    """The example with its hosts (example.com, huggingface.co) pointed at the loopback file server."""
    text = json.dumps(body).replace("https://example.com", url).replace("https://huggingface.co", url)
    return {"id": "runpod-example", **json.loads(text)}


def serving_examples() -> FileServer:
    """A loopback file server with what the examples' URLs point at (enter it to start it)."""
    return FileServer({"/fashion-photo.png": Route(encode_picture(INPUT)),
                       "/portrait.jpg": Route(encode_picture(INPUT, "JPEG", quality=95)),
                       "/photo.jpg": Route(encode_picture(INPUT, "JPEG", quality=95)),
                       "/example/anime-lora/model.safetensors": Route(lora_bytes(40))})
