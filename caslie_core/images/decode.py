"""`decode_image`: bytes to a letterboxed RGB array, whatever the mode, bounded in memory by construction.

Only the formats in `FORMATS` are opened (Pillow would otherwise try each of its ~40 plugins: ICO decodes an
embedded PNG while opening, EPS calls Ghostscript). Before any pixel is decoded, the header's size is checked
against `max_pixels` and the decoded size in memory (by mode) against `max_decoded_bytes`; JPEGs are decoded
reduced by the codec (DCT scaling) when far larger than needed; high-bit-depth pictures (16-bit, 32-bit int
or float) are shrunk in their own mode before they become 8-bit, so nothing of full size passes through
float64. Any failure of a decoder on a malformed file is an `ImageError('decode')`, never another exception.
"""

from __future__ import annotations

import io

from ..errors import ImageError

# What catalogs and clients send; Pillow's other plugins stay closed (ICO, EPS, DDS, BLP, PSD, ...).
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
# Bytes per pixel as Pillow holds a decoded picture, by mode (RGB is stored in 4 bytes).
_BYTES_PER_PIXEL = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2, "LA": 4, "PA": 4}
_HIGH_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
MAX_DECODED_BYTES = 4 * 40_000_000  # the default pixel cap at 4 bytes a pixel
_ORIENTATION = 0x0112  # EXIF orientation -> the transpose that shows the picture upright
_TRANSPOSE = {2: 0, 3: 3, 4: 1, 5: 5, 6: 4, 7: 6, 8: 2}  # PIL.Image.Transpose values

# Decoding


def decode_image(
    data: bytes, *, max_pixels: int = 40_000_000, size: int = 336, max_decoded_bytes: int = MAX_DECODED_BYTES
):
    """Bytes -> RGB uint8 array `size x size` (letterboxed on white). Raises `ImageError('decode')`."""
    import warnings

    import numpy as np
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise ImageError("decode", "empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=FORMATS)
            check_size(im, max_pixels, max_decoded_bytes)
            if getattr(im, "is_animated", False):
                im.seek(0)
                check_size(im, max_pixels, max_decoded_bytes)
            if im.format == "JPEG" and min(im.size) > 4 * size:
                im.draft(im.mode, (2 * size, 2 * size))  # the codec decodes at 1/2, 1/4 or 1/8 scale
            orientation = im.getexif().get(_ORIENTATION)
            im.load()
            im = to_rgb(shrink(im, 2 * size))  # every full-size step is done once, in the picture's own mode
            if orientation in _TRANSPOSE:
                im = im.transpose(_TRANSPOSE[orientation])
            return np.asarray(letterbox(im, size), dtype=np.uint8)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError("decode", f"not an image in an accepted format ({', '.join(FORMATS)})") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError("decode", f"decompression-bomb guard: {e}") from None
    except MemoryError:
        raise ImageError("decode", "not enough memory to decode this image") from None
    except (OSError, SyntaxError, ValueError) as e:  # what Pillow raises for a file it cannot read
        raise ImageError("decode", f"corrupt or truncated image: {str(e)[:200]}") from None
    except Exception:  # noqa: BLE001 - any other decoder failure on a malformed file is this image's error too
        raise ImageError("decode", "corrupt image (the decoder failed on it)") from None


def check_size(im, max_pixels: int, max_decoded_bytes: int) -> None:
    """The header's size against the pixel cap and the decoded size against the memory budget."""
    w, h = im.size
    if w <= 0 or h <= 0:
        raise ImageError("decode", f"image has no pixels ({w}x{h})")
    if w * h > max_pixels:
        raise ImageError(
            "decode", f"{w}x{h} = {w * h} pixels is over the {max_pixels}-pixel limit (decompression-bomb guard)"
        )
    need = w * h * _BYTES_PER_PIXEL.get(im.mode, 4)
    if need > max_decoded_bytes:
        raise ImageError(
            "decode", f"{w}x{h} in mode {im.mode} needs {need} bytes decoded, over the {max_decoded_bytes}-byte budget"
        )


def shrink(im, bound: int):
    """The decoded picture brought within `bound` pixels a side before any conversion: box-averaged in its
    own mode (`reduce` for 8-bit modes, `resize` where reduce has no kernel), palette pictures by nearest."""
    from PIL import Image

    w, h = im.size
    if max(w, h) > bound:
        if im.mode in ("P", "1"):
            im = im.resize(_fit(w, h, bound), Image.Resampling.NEAREST)
        elif im.mode in _HIGH_BIT:
            return high_bit_to_8bit(im, bound)
        else:
            factor = max(1, max(w, h) // bound)
            im = im.reduce(factor) if factor > 1 else im
    return high_bit_to_8bit(im, bound) if im.mode in _HIGH_BIT else im


def _fit(w: int, h: int, bound: int) -> tuple[int, int]:
    scale = min(1.0, bound / max(w, h))
    return max(1, round(w * scale)), max(1, round(h * scale))


def high_bit_to_8bit(im, bound: int):
    """A 16/32-bit picture -> 8-bit L, stretched to its own range; shrunk to within `bound` first (in its
    own mode, by box averaging), so only a small array is ever converted."""
    import numpy as np
    from PIL import Image

    if max(im.size) > bound:
        im = im.resize(_fit(*im.size, bound), Image.Resampling.BOX)
    arr = np.asarray(im).astype(np.float32)
    arr = np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = float(arr.min(initial=0.0)), float(arr.max(initial=0.0))
    if lo < 0:
        arr -= lo
        hi -= lo
    return Image.fromarray((arr * (255.0 / (hi or 1.0))).clip(0, 255).astype("uint8"), "L")


def to_rgb(im):
    """Any PIL mode -> RGB; transparency is composited on white."""
    from PIL import Image

    if im.mode == "RGB":
        return im
    if im.mode in _HIGH_BIT:
        im = high_bit_to_8bit(im, max(im.size))
    if im.mode == "P":
        im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        im = im.convert("RGBA")
        background = Image.new("RGB", im.size, (255, 255, 255))
        background.paste(im, mask=im.getchannel("A"))
        return background
    return im.convert("RGB")


def letterbox(im, size: int):
    from PIL import Image

    w, h = im.size
    scale = size / max(w, h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    resized = im.resize((nw, nh), Image.Resampling.BICUBIC)
    canvas = Image.new("RGB", (size, size), (255, 255, 255))
    canvas.paste(resized, ((size - nw) // 2, (size - nh) // 2))
    return canvas
