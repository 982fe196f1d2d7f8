"""A loopback HTTP server answering fixed routes: `{path: (status, headers, body)}`.

A header whose value is "omit" is left out (with Content-Length that gives a body that ends when
the connection closes).  Requests are recorded in `hits`.
"""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class Routes(http.server.BaseHTTPRequestHandler):
    table: dict[str, tuple[int, dict[str, str], bytes]] = {}
    hits: list[str] = []

    def do_GET(self) -> None:  # noqa: N802
        self.hits.append(self.path)
        status, headers, body = self.table.get(self.path, (404, {}, b"missing"))
        self.send_response(status)
        for key, value in headers.items():
            if value != "omit":
                self.send_header(key, value)
        if "Content-Length" not in headers:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@contextmanager
def serve_routes() -> Iterator[str]:
    """Serve `Routes.table` on a free loopback port; yield the base URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Routes)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
