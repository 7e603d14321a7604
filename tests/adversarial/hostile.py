"""What a hostile client or image host sends, built locally: trickling servers and clients, image bombs and
malformed files. Everything binds to 127.0.0.1 and ends when the test closes it."""

from __future__ import annotations

import io
import socket
import struct
import threading
import time
import zlib


class TrickleHost:
    """An image host that answers every GET with `200`, a large Content-Length, then one byte every `every_s`
    seconds until the client goes away. `open` counts the connections it is still trickling into."""

    def __init__(self, every_s: float = 0.5, length: int = 1_000_000) -> None:
        self.every_s, self.length = every_s, length
        self.open = 0
        self.accepted = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(256)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            with self._lock:
                self.open += 1
                self.accepted += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(5)
            conn.recv(65536)  # the request (small)
            conn.sendall(
                f"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: {self.length}\r\n\r\n".encode()
            )
            while not self._stop.wait(self.every_s):
                conn.sendall(b"\x89")
        except OSError:
            pass  # the client closed: the fetch gave up
        finally:
            conn.close()
            with self._lock:
                self.open -= 1

    def wait_closed(self, seconds: float) -> int:
        """Wait until no connection is open (or `seconds` pass); how many are still open."""
        end = time.monotonic() + seconds
        while self.open and time.monotonic() < end:
            time.sleep(0.05)
        return self.open

    def close(self) -> None:
        self._stop.set()
        self.sock.close()


def png16(width: int, height: int) -> bytes:
    """A 16-bit greyscale PNG of `width x height` that compresses to almost nothing (a decompression bomb
    in memory, not in pixels: under the pixel cap)."""
    z, row, parts = zlib.compressobj(9), b"\x00" + b"\x12\x34" * width, []
    for _ in range(height):
        parts.append(z.compress(row))
    raw = b"".join(parts) + z.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def ico_with_big_png(side: int = 4096) -> bytes:
    """An ICO whose one entry is a large PNG (Pillow decodes it while opening the ICO)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGBA", (side, side), (1, 2, 3, 255)).save(buf, "PNG", optimize=True)
    png = buf.getvalue()
    header = struct.pack("<HHH", 0, 1, 1)
    entry = struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(png), 6 + 16)
    return header + entry + png


def eps_file() -> bytes:
    return b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"


def corpus() -> dict[str, bytes]:
    """One small valid file per accepted format and mode family, the seeds of the fuzz tests."""
    from PIL import Image

    out = {}
    for name, mode, fmt, kw in [
        ("rgb.jpg", "RGB", "JPEG", {}),
        ("grey.jpg", "L", "JPEG", {}),
        ("cmyk.jpg", "CMYK", "JPEG", {}),
        ("rgba.png", "RGBA", "PNG", {}),
        ("palette.png", "P", "PNG", {"transparency": 0}),
        ("i16.png", "I;16", "PNG", {}),
        ("rgb.webp", "RGB", "WEBP", {}),
        ("anim.gif", "P", "GIF", {"save_all": True}),
        ("rgb.bmp", "RGB", "BMP", {}),
        ("float.tif", "F", "TIFF", {}),
        ("rgb.tif", "RGB", "TIFF", {"compression": "tiff_lzw"}),
    ]:
        im = Image.new(mode, (24, 16))
        im.putpixel((3, 4), 200 if mode in ("L", "P", "I;16", "F") else tuple(range(60, 60 + len(mode))))
        buf = io.BytesIO()
        if kw.get("save_all"):
            im.save(buf, fmt, save_all=True, append_images=[im.copy()], duration=50, loop=0)
        else:
            im.save(buf, fmt, **kw)
        out[name] = buf.getvalue()
    return out
