"""A local HTTP/1.1 keep-alive image server with misbehaving routes, for fetch tests (127.0.0.1 only)."""

from __future__ import annotations

import http.server
import ssl
import threading
import time
from collections import Counter
from pathlib import Path


class ImageServer:
    """Serves files from `root` over HTTP/1.1 keep-alive (every answer has a Content-Length, except
    /chunked/), plus routes that fail on purpose:

    /flaky/NAME             500 on the first request for NAME, then the file
    /slow/NAME              sleeps `slow_s` before answering (past the client's read timeout)
    /missing/X              404
    /redirect-loopback      302 to a 127.0.0.1 URL (reach it as `localhost` to test re-checks)
    /empty                  200 with an empty body
    /retry-after/NAME       429 with `Retry-After: 1` on the first request for NAME, then the file
    /retry-after-long/NAME  503 with `Retry-After: 3600`, always
    /drip/NAME              headers with the true Content-Length, then one byte every `drip_s` seconds
    /close/NAME             the file, with `Connection: close` (the server closes the connection)
    /drop/NAME              the file, keep-alive headers, then the server closes the connection anyway
    /chunked/NAME           the file with Transfer-Encoding: chunked (kept alive)

    Every request path is counted in `hits`; every TCP connection accepted in `connections`. With `tls`
    (a server-side SSLContext) it speaks HTTPS; the SNI names clients sent are listed in `sni`.
    """

    def __init__(self, root: Path, slow_s: float = 3.0, drip_s: float = 1.0, tls: ssl.SSLContext | None = None) -> None:
        self.root = Path(root)
        self.tls = tls
        self.sni: list = []
        self.slow_s = slow_s
        self.drip_s = drip_s
        self.hits: Counter = Counter()
        self.connections = 0
        self.closing = threading.Event()
        self._lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive unless a side says Connection: close
            disable_nagle_algorithm = True  # headers and body are separate writes

            def log_message(self, *args):
                pass

            def setup(self):
                if server.tls is not None:  # the handshake in this connection's thread, not the accept loop
                    self.request.settimeout(5)
                    self.request = server.tls.wrap_socket(self.request, server_side=True)
                    self.request.settimeout(None)
                super().setup()

            def finish(self):
                try:
                    super().finish()
                finally:
                    if server.tls is not None:
                        self.request.close()  # the wrapped socket: the server closes only the original

            def handle(self):
                try:
                    super().handle()
                except (OSError, ssl.SSLError):
                    pass

            def do_GET(self):  # noqa: N802
                with server._lock:
                    server.hits[self.path] += 1
                    hit = server.hits[self.path]
                path = self.path
                route, _, rest = path.lstrip("/").partition("/")
                name = "/" + rest
                if route == "flaky":
                    if hit == 1:
                        return self._send(500, b"try again")
                    path = name
                elif route == "slow":
                    time.sleep(server.slow_s)
                    path = name
                elif route == "missing":
                    return self._send(404, b"not found")
                elif path == "/redirect-loopback":
                    return self._send(302, b"", {"Location": f"http://127.0.0.1:{server.port}/x.png"})
                elif path == "/empty":
                    return self._send(200, b"")
                elif route == "retry-after":
                    if hit == 1:
                        return self._send(429, b"slow down", {"Retry-After": "1"})
                    path = name
                elif route == "retry-after-long":
                    return self._send(503, b"busy", {"Retry-After": "3600"})
                elif route in ("drip", "close", "drop", "chunked"):
                    path = name
                f = server.root / path.lstrip("/")
                if not f.is_file():
                    return self._send(404, b"not found")
                body = f.read_bytes()
                if route == "drip":
                    return self._drip(body)
                if route == "close":
                    return self._send(200, body, {"Connection": "close"})
                if route == "chunked":
                    return self._chunked(body)
                self._send(200, body)
                if route == "drop":
                    self.close_connection = True  # without telling the client

            def _send(self, code, body, headers=None):
                try:
                    self.send_response(code)
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True

            def _drip(self, body):
                try:
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    for i in range(len(body)):
                        self.wfile.write(body[i : i + 1])
                        if server.closing.wait(server.drip_s):
                            break
                except (BrokenPipeError, ConnectionResetError):
                    pass
                self.close_connection = True

            def _chunked(self, body):
                try:
                    self.send_response(200)
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    for i in range(0, len(body), 50):
                        part = body[i : i + 50]
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
                    self.wfile.write(b"0\r\n\r\n")
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def process_request(self, request, client_address):
                with server._lock:
                    server.connections += 1
                super().process_request(request, client_address)

            def handle_error(self, request, client_address):
                pass  # a client that hung up or refused our certificate: expected in these tests

        if tls is not None:
            tls.sni_callback = lambda sock, name, ctx: self.sni.append(name) and None
        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.closing.set()
        self.httpd.shutdown()
        self.httpd.server_close()
