"""A local HTTP image server with misbehaving routes, for fetch tests (127.0.0.1 only)."""

from __future__ import annotations

import http.server
import threading
import time
from collections import Counter
from pathlib import Path


class ImageServer:
    """Serves files from `root`, plus routes that fail on purpose:

    /flaky/NAME  500 on the first request for NAME, then the file
    /slow/NAME   sleeps `slow_s` before answering (past the client's read timeout)
    /missing/X   404
    /redirect-loopback  302 to a 127.0.0.1 URL (reach it as `localhost` to test re-checks)
    Every request path is counted in `hits`.
    """

    def __init__(self, root: Path, slow_s: float = 3.0) -> None:
        self.root = Path(root)
        self.slow_s = slow_s
        self.hits: Counter = Counter()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):  # noqa: N802
                server.hits[self.path] += 1
                path = self.path
                if path.startswith("/flaky/"):
                    if server.hits[path] == 1:
                        return self._send(500, b"try again")
                    path = "/" + path.split("/", 2)[2]
                elif path.startswith("/slow/"):
                    time.sleep(server.slow_s)
                    path = "/" + path.split("/", 2)[2]
                elif path.startswith("/missing/"):
                    return self._send(404, b"not found")
                elif path == "/redirect-loopback":
                    self.send_response(302)
                    self.send_header("Location", f"http://127.0.0.1:{server.port}/x.png")
                    self.end_headers()
                    return
                f = server.root / path.lstrip("/")
                if not f.is_file():
                    return self._send(404, b"not found")
                return self._send(200, f.read_bytes())

            def _send(self, code, body):
                try:
                    self.send_response(code)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
