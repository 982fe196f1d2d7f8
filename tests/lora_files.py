"""Test aids for request LoRAs: tiny LoRA files in each naming style, and a loopback file server.

The LoRAs are built from the tiny transformer's own module names (qwen_edit_worker.model.tiny),
in the key styles people share: diffusers/PEFT (`transformer.<module>.lora_A/B.weight`), Kohya
(`lora_unet_<module_with_underscores>.lora_down/up.weight` + `.alpha`), ComfyUI
(`diffusion_model.<module>.lora_down/up.weight` + `.alpha`) and LightX2V (`<module>.lora_down/up`).
The server answers GET on 127.0.0.1 with fixed bodies, counts requests per path, and can delay,
break off, redirect or refuse.
"""

from __future__ import annotations

import http.server
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save, save_file

from qwen_edit_worker.model import tiny

STYLES = ("peft", "kohya", "comfyui", "lightx2v")


def lora_state(seed: int, style: str = "peft", rank: int = 2) -> dict[str, torch.Tensor]:
    """A random LoRA for every LoRA'd layer of the tiny transformer, keys in `style`."""
    generator = torch.Generator().manual_seed(1000 + seed)
    out: dict[str, torch.Tensor] = {}
    for key, value in tiny.lora_state_dict(rank=rank).items():  # LightX2V-style keys, for the shapes
        module, kind = key.rsplit(".", 2)[0], key.rsplit(".", 2)[1]
        if key.endswith(".alpha"):
            module, kind = key.removesuffix(".alpha"), "alpha"
        tensor = value if kind == "alpha" else torch.randn(value.shape, generator=generator) * 0.5
        if style == "peft":
            if kind != "alpha":
                out[f"transformer.{module}.{'lora_A' if kind == 'lora_down' else 'lora_B'}.weight"] = tensor
        elif style == "kohya":
            flat = "lora_unet_" + module.replace(".", "_")
            out[f"{flat}.alpha" if kind == "alpha" else f"{flat}.{kind}.weight"] = tensor
        elif style == "comfyui":
            out[f"diffusion_model.{module}.alpha" if kind == "alpha" else f"diffusion_model.{key}"] = tensor
        else:
            out[key] = tensor
    return out


def lora_bytes(seed: int, style: str = "peft", rank: int = 2) -> bytes:
    return save(lora_state(seed, style, rank))


def write_lora(path: Path, seed: int, style: str = "peft", rank: int = 2) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(lora_state(seed, style, rank), str(path))
    return path


@dataclass
class Route:
    body: bytes = b""
    status: int = 200
    delay_s: float = 0.0  # before the body (a slow server)
    break_off: bool = False  # send half the body, then close
    location: str = ""  # a redirect target


@dataclass
class FileServer:
    routes: dict[str, Route] = field(default_factory=dict)
    hits: Counter[str] = field(default_factory=Counter)
    hit_at: dict[str, list[float]] = field(default_factory=dict)  # time.perf_counter() of each request
    url: str = ""

    def __enter__(self) -> FileServer:
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802
                path = self.path.split("?", 1)[0]
                server.hits[path] += 1
                server.hit_at.setdefault(path, []).append(time.perf_counter())
                route = server.routes.get(path, Route(b"missing", 404))
                time.sleep(route.delay_s)
                self.send_response(route.status)
                if route.location:
                    self.send_header("Location", route.location)
                self.send_header("Content-Length", str(len(route.body)))
                self.end_headers()
                body = route.body[: len(route.body) // 2] if route.break_off else route.body
                try:
                    self.wfile.write(body)
                    self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    pass
                if route.break_off:
                    self.close_connection = True

            def log_message(self, *args: object) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
