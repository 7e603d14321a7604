import io

import numpy as np
import pytest
from imageserver import ImageServer
from PIL import Image

from caslie_core.errors import ImageError
from caslie_core.images import FetchPolicy, address_refusal, decode_image, fetch_image


@pytest.mark.parametrize(
    "ip,fragment",
    [
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("10.1.2.3", "private"),
        ("192.168.0.10", "private"),
        ("172.16.5.4", "private"),
        ("169.254.169.254", "metadata"),
        ("169.254.10.1", "link-local"),
        ("fe80::1", "link-local"),
        ("fd00::5", "private"),
        ("::ffff:127.0.0.1", "loopback"),
        ("0.0.0.0", "unspecified"),
        ("100.64.1.1", "shared"),
        ("224.0.0.1", "multicast"),
        ("fd00:ec2::254", "metadata"),
    ],
)
def test_address_rules_refuse_special_ranges(ip, fragment):
    why = address_refusal(ip)
    assert why is not None and fragment in why


def test_address_rules_allow_public_and_allowlisted():
    assert address_refusal("93.184.216.34") is None
    assert address_refusal("2606:4700::1111") is None
    assert address_refusal("10.1.2.3", ["10.0.0.0/8"]) is None
    assert address_refusal("127.0.0.1", ["127.0.0.1/32"]) is None


def png_bytes(mode="RGB", size=(40, 30), **save):
    im = Image.new(mode, size)
    buf = io.BytesIO()
    im.save(buf, "PNG", **save)
    return buf.getvalue()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("img")
    (root / "ok.png").write_bytes(png_bytes())
    (root / "big.png").write_bytes(b"\x89PNG" + b"0" * 50_000)
    srv = ImageServer(root, slow_s=1.5)
    yield srv
    srv.close()


def policy(**kw):
    base = dict(allowlist=["127.0.0.1/32"], retries=2, backoff=0.01, connect_timeout=2, read_timeout=0.5)
    base.update(kw)
    return FetchPolicy(**base)


def test_fetch_ok_and_retry_after_500(server):
    assert fetch_image(f"{server.url}/ok.png", policy()) == (server.root / "ok.png").read_bytes()
    data = fetch_image(f"{server.url}/flaky/ok.png", policy())
    assert data.startswith(b"\x89PNG") and server.hits["/flaky/ok.png"] == 2


def test_fetch_404_is_not_retried(server):
    with pytest.raises(ImageError, match="HTTP 404") as e:
        fetch_image(f"{server.url}/missing/a.png", policy())
    assert e.value.stage == "fetch" and server.hits["/missing/a.png"] == 1


def test_fetch_slow_times_out_after_retries(server):
    with pytest.raises(ImageError, match="timed out") as e:
        fetch_image(f"{server.url}/slow/ok.png", policy(retries=1))
    assert "after 2 attempts" in str(e.value)


def test_fetch_byte_cap(server):
    with pytest.raises(ImageError, match="byte cap"):
        fetch_image(f"{server.url}/big.png", policy(max_bytes=10_000))


def test_loopback_refused_without_allowlist_and_server_sees_nothing(server):
    before = sum(server.hits.values())
    with pytest.raises(ImageError, match="loopback"):
        fetch_image(f"{server.url}/ok.png?refused", FetchPolicy(retries=0))
    assert sum(server.hits.values()) == before


def test_redirect_to_unlisted_host_is_checked_again(server):
    # With the loopback CIDR allowlisted, the redirect is followed (to a 404).
    with pytest.raises(ImageError, match="404"):
        fetch_image(f"{server.url}/redirect-loopback", policy())
    # Only the host name `localhost` is allowlisted: the first hop goes through, the redirect to
    # 127.0.0.1 is checked again and refused, and the server never sees that second request.
    before = server.hits["/x.png"]
    url = f"http://localhost:{server.port}/redirect-loopback"
    with pytest.raises(ImageError, match="refused: 127.0.0.1 resolves to 127.0.0.1 is a loopback"):
        fetch_image(url, FetchPolicy(allowlist=["localhost"], retries=0))
    assert server.hits["/x.png"] == before


def test_schemes_and_local_files(tmp_path):
    p = tmp_path / "a.png"
    p.write_bytes(png_bytes())
    with pytest.raises(ImageError, match="local file"):
        fetch_image(str(p), FetchPolicy())
    assert fetch_image(str(p), FetchPolicy(allow_local_files=True)) == p.read_bytes()
    with pytest.raises(ImageError, match="scheme 'ftp'"):
        fetch_image("ftp://example.com/a.png", FetchPolicy())
    with pytest.raises(ImageError, match="not found"):
        fetch_image(str(tmp_path / "nope.png"), FetchPolicy(allow_local_files=True))


def encode(im, fmt="PNG", **kw):
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize(
    "make",
    [
        lambda: encode(Image.new("RGBA", (20, 10), (255, 0, 0, 0))),  # fully transparent -> white
        lambda: encode(Image.new("P", (20, 10))),
        lambda: encode(Image.new("L", (20, 10), 128)),
        lambda: encode(Image.new("1", (20, 10))),
        lambda: encode(Image.new("CMYK", (20, 10), (0, 0, 0, 0)), "JPEG"),
        lambda: encode(Image.new("I;16", (20, 10), 4000)),
        lambda: encode(Image.new("LA", (20, 10))),
    ],
)
def test_decode_modes_to_rgb_square(make):
    arr = decode_image(make(), size=16)
    assert arr.shape == (16, 16, 3) and arr.dtype == np.uint8


def test_transparent_pixels_become_white_and_letterbox_keeps_aspect():
    arr = decode_image(encode(Image.new("RGBA", (20, 10), (255, 0, 0, 0))), size=20)
    assert (arr == 255).all()
    arr = decode_image(encode(Image.new("RGB", (40, 10), (0, 0, 0))), size=40)
    assert (arr[0] == 255).all() and (arr[20] == 0).all()  # white bars above, image in the middle


def test_exif_orientation_is_applied():
    im = Image.new("RGB", (40, 20), (0, 0, 0))
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    arr = decode_image(encode(im, "JPEG", exif=exif), size=40)
    # After rotation the picture is 20 wide, 40 tall: white bars left and right, dark in the middle.
    assert arr[20, 2].min() > 200 and arr[20, 20].max() < 60


def test_animated_gif_first_frame():
    frames = [Image.new("RGB", (10, 10), c) for c in [(255, 0, 0), (0, 0, 255)]]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    arr = decode_image(buf.getvalue(), size=10)
    assert arr[5, 5, 0] > 200 and arr[5, 5, 2] < 50


@pytest.mark.parametrize(
    "data,fragment",
    [(b"", "empty"), (b"<html>nope</html>", "not an image"), (encode(Image.new("RGB", (64, 64)))[:60], "truncated")],
)
def test_decode_failures(data, fragment):
    with pytest.raises(ImageError, match=fragment) as e:
        decode_image(data, size=8)
    assert e.value.stage == "decode"


def test_decompression_bomb_guard_reads_only_the_header():
    data = encode(Image.new("L", (3000, 3000)))
    with pytest.raises(ImageError, match="pixel limit"):
        decode_image(data, max_pixels=1_000_000, size=8)
