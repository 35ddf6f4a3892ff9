"""A plain HTTP server on loopback with the answers a media URL can give: a picture, redirects, errors, bodies
past a bound, a slow answer. The Host header of every request is kept (``Files.hosts``)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tests.support import media

PICTURE = media.png()


class Files(BaseHTTPRequestHandler):
    hosts: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 (the standard library's name)
        self.hosts.append(self.headers.get("host", ""))
        if self.path == "/pic.png":
            self._send(200, PICTURE)
        elif self.path.startswith("/hop/"):
            left = int(self.path.rsplit("/", 1)[1])
            self.send_response(302)
            self.send_header("location", "/pic.png" if left == 0 else f"/hop/{left - 1}")
            self.end_headers()
        elif self.path == "/elsewhere":
            self.send_response(307)
            self.send_header("location", "http://nowhere.test/pic.png")
            self.end_headers()
        elif self.path == "/declared-big":
            self.send_response(200)
            self.send_header("content-length", str(10**9))
            self.end_headers()
        elif self.path == "/undeclared-big":  # no length: the bound is found while reading
            self.send_response(200)
            self.end_headers()
            for _ in range(64):
                self.wfile.write(b"x" * 65536)
        elif self.path == "/slow":
            time.sleep(3)
            self._send(200, PICTURE)
        else:
            self._send(404, b"no")

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: object) -> None:
        pass


@contextlib.contextmanager
def files_server() -> Iterator[int]:
    """A ``Files`` server on a free loopback port: its port."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), Files)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
