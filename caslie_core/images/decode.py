"""`decode_image`: bytes to a letterboxed RGB array, whatever the mode, with a decompression-bomb guard."""

from __future__ import annotations

import io

from ..errors import ImageError

# Decoding


def decode_image(data: bytes, *, max_pixels: int = 40_000_000, size: int = 336):
    """Bytes -> RGB uint8 array `size x size` (letterboxed on white). Raises `ImageError('decode')`."""
    import warnings

    import numpy as np
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not data:
        raise ImageError("decode", "empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            w, h = im.size
            if w * h > max_pixels:
                raise ImageError(
                    "decode",
                    f"{w}x{h} = {w * h} pixels is over the {max_pixels}-pixel limit (decompression-bomb guard)",
                )
            if getattr(im, "is_animated", False):
                im.seek(0)
            im = ImageOps.exif_transpose(im) or im
            im.load()
            im = to_rgb(im)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError("decode", "not an image (unrecognised format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError("decode", f"decompression-bomb guard: {e}") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError("decode", f"corrupt or truncated image: {e}") from None
    return np.asarray(letterbox(im, size), dtype=np.uint8)


def to_rgb(im):
    """Any PIL mode -> RGB; transparency is composited on white."""
    from PIL import Image

    if im.mode == "RGB":
        return im
    if im.mode == "P":
        im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        import numpy as np

        arr = np.asarray(im, dtype=np.float64)
        hi = arr.max() or 1.0
        im = Image.fromarray((arr * (255.0 / hi)).clip(0, 255).astype("uint8"), "L")
    if im.mode in ("RGBA", "LA", "PA"):
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
