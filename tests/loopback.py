"""The test fakes' one HTTP server: threaded, on 127.0.0.1 at a port the kernel picks, quiet.

Why this exists: the fakes of RunPod's queue API (fake_runpod.py), its REST API (runpod_rest.py) and the
Hugging Face hub (hub_server.py) each built the same handler class, server and start/stop; a fake now
subclasses LoopbackServer, says which methods it answers, and handles each request in `serve`.
"""

from __future__ import annotations

import http.server
import threading
from typing import Self


class LoopbackServer:
    """Answers METHODS with `serve(request)`; `url` is set once built, `with` starts and stops it."""

    METHODS: tuple[str, ...] = ("GET", "POST")
    PROTOCOL = "HTTP/1.0"

    def __init__(self) -> None:
        def answer(handler: http.server.BaseHTTPRequestHandler) -> None:
            self.serve(handler)

        members: dict[str, object] = {f"do_{method}": answer for method in self.METHODS}
        members |= {"protocol_version": self.PROTOCOL, "log_message": lambda handler, *args: None}
        handler = type("Handler", (http.server.BaseHTTPRequestHandler,), members)
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def serve(self, request: http.server.BaseHTTPRequestHandler) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
