import email.utils
import functools
import io
import socket
import threading
import time

import numpy as np
import pytest
from imageserver import ImageServer
from PIL import Image

from caslie_core.errors import ImageError
from caslie_core.images import (
    FetchPolicy,
    address_refusal,
    close_idle_connections,
    connections,
    decode_image,
    fetch_image,
    pool_stats,
    retry_after_seconds,
)


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
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("img")
    (root / "ok.png").write_bytes(png_bytes())
    (root / "big.png").write_bytes(b"\x89PNG" + b"0" * 50_000)
    for i in range(8):  # distinct contents: a mix-up between threads would show
        (root / f"f{i}.png").write_bytes(png_bytes(size=(10 + i, 7 + 3 * i)))
    return root


@pytest.fixture(scope="module")
def server(root):
    srv = ImageServer(root, slow_s=1.5)
    yield srv
    srv.close()
    close_idle_connections()


@pytest.fixture
def fresh(root):
    """A server of its own, so that its connection count belongs to one test."""
    srv = ImageServer(root, slow_s=1.5)
    yield srv
    srv.close()
    close_idle_connections()


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
    before, connections = sum(server.hits.values()), server.connections
    with pytest.raises(ImageError, match="loopback"):
        fetch_image(f"{server.url}/ok.png?refused", FetchPolicy(retries=0))
    assert sum(server.hits.values()) == before and server.connections == connections


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


# Pooled keep-alive connections, Retry-After, the total deadline


def test_sequential_fetches_reuse_one_connection(fresh, root):
    expected = (root / "ok.png").read_bytes()
    before = pool_stats()
    for _ in range(20):
        assert fetch_image(f"{fresh.url}/ok.png", policy()) == expected
    assert fresh.connections == 1 and fresh.hits["/ok.png"] == 20
    after = pool_stats()
    assert after["opened"] - before["opened"] == 1 and after["reused"] - before["reused"] == 19


def test_pool_off_opens_a_connection_per_fetch(fresh, root):
    for _ in range(5):
        assert fetch_image(f"{fresh.url}/ok.png", policy(pool=False)) == (root / "ok.png").read_bytes()
    assert fresh.connections == 5


def test_chunked_error_and_redirect_bodies_keep_the_connection(fresh, root):
    for _ in range(3):
        assert fetch_image(f"{fresh.url}/chunked/ok.png", policy()) == (root / "ok.png").read_bytes()
    with pytest.raises(ImageError, match="HTTP 404"):
        fetch_image(f"{fresh.url}/missing/a.png", policy())
    with pytest.raises(ImageError, match="HTTP 404"):  # 302 to 127.0.0.1/x.png, then 404
        fetch_image(f"{fresh.url}/redirect-loopback", policy())
    assert fresh.connections == 1 and fresh.hits["/x.png"] == 1


def test_concurrent_fetches_from_8_threads_are_correct(fresh, root):
    expected = {f"f{i}.png": (root / f"f{i}.png").read_bytes() for i in range(8)}
    errors, done = [], []

    def work(t):
        try:
            for j in range(15):
                name = f"f{(t + j) % 8}.png"
                route = ("", "chunked/", "")[j % 3]
                data = fetch_image(f"{fresh.url}/{route}{name}", policy())
                assert data == expected[name], (t, j, name)
                done.append(name)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(20)
    assert not errors and len(done) == 8 * 15
    assert fresh.connections <= 8  # a new connection only while every other one is in use


def test_empty_body_is_empty_bytes_and_keeps_the_connection(fresh):
    assert fetch_image(f"{fresh.url}/empty", policy()) == b""
    assert fetch_image(f"{fresh.url}/empty", policy()) == b""
    assert fresh.connections == 1
    with pytest.raises(ImageError, match="empty file"):
        decode_image(b"", size=8)


def test_connection_close_is_not_pooled(fresh, root):
    for _ in range(3):
        assert fetch_image(f"{fresh.url}/close/ok.png", policy()) == (root / "ok.png").read_bytes()
    assert fresh.connections == 3
    fetch_image(f"{fresh.url}/ok.png", policy())
    assert fresh.connections == 4


def test_server_closed_pooled_connection_is_replaced_without_a_retry(fresh, root, monkeypatch):
    ok = (root / "ok.png").read_bytes()
    before = pool_stats()
    assert fetch_image(f"{fresh.url}/drop/ok.png", policy(retries=0)) == ok  # pooled; then the server closes
    time.sleep(0.05)
    assert fetch_image(f"{fresh.url}/ok.png", policy(retries=0)) == ok  # found closed before use
    assert fresh.connections == 2
    mid = pool_stats()
    assert (mid["discarded"] + mid["stale_replaced"]) - (before["discarded"] + before["stale_replaced"]) == 1
    # Without the idle check, the request goes out on the dead connection and is sent again on a fresh one.
    monkeypatch.setattr(connections, "_is_dropped", lambda sock: False)
    assert fetch_image(f"{fresh.url}/drop/ok.png", policy(retries=0)) == ok
    time.sleep(0.05)
    assert fetch_image(f"{fresh.url}/ok.png", policy(retries=0)) == ok
    assert pool_stats()["stale_replaced"] == mid["stale_replaced"] + 1 and fresh.connections == 3


def test_pooled_connection_is_used_only_for_the_checked_address(fresh, monkeypatch):
    real = socket.getaddrinfo
    answer = {"img.test": "127.0.0.1"}

    def fake(host, *args, **kwargs):
        if host in answer:
            return real(answer[host], *args, **kwargs)
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    loop = functools.partial(policy, allowlist=["127.0.0.0/8"])
    url = f"http://img.test:{fresh.port}/ok.png"
    assert fetch_image(url, loop(retries=0)).startswith(b"\x89PNG")
    # The name now points elsewhere (DNS rebinding): the pooled connection to 127.0.0.1 is not used.
    answer["img.test"] = "127.0.0.2"  # allowlisted too, but nothing listens there
    with pytest.raises(ImageError, match="cannot connect"):
        fetch_image(url, loop(retries=0))
    answer["img.test"] = "10.1.2.3"  # not allowlisted: refused before any connection
    with pytest.raises(ImageError, match="private"):
        fetch_image(url, loop(retries=0))
    # Allowed by one policy, refused by the next one even though an idle connection is waiting.
    answer["img.test"] = "127.0.0.1"
    fetch_image(url, loop(retries=0))
    with pytest.raises(ImageError, match="loopback"):
        fetch_image(url, FetchPolicy(retries=0))
    assert fresh.connections == 1 and fresh.hits["/ok.png"] == 2


def test_retry_after_seconds_is_waited(server):
    waits = []
    data = fetch_image(f"{server.url}/retry-after/ok.png", policy(), sleep=waits.append)
    assert data.startswith(b"\x89PNG") and server.hits["/retry-after/ok.png"] == 2
    assert waits == [pytest.approx(1.0)]


def test_retry_after_past_the_deadline_fails_at_once(server):
    waits = []
    t0 = time.monotonic()
    with pytest.raises(ImageError, match=r"HTTP 503 .*Retry-After: 3600.*20s total deadline") as e:
        fetch_image(f"{server.url}/retry-after-long/ok.png", policy(retries=3, total_timeout=20), sleep=waits.append)
    assert waits == [] and server.hits["/retry-after-long/ok.png"] == 1 and time.monotonic() - t0 < 5
    assert e.value.stage == "fetch"


def test_retry_after_values():
    assert retry_after_seconds("120") == 120
    assert retry_after_seconds(" 0 ") == 0
    now = time.time()
    date = email.utils.formatdate(now + 30, usegmt=True)
    assert retry_after_seconds(date, now=now) == pytest.approx(30, abs=1)
    assert retry_after_seconds(email.utils.formatdate(now - 30, usegmt=True), now=now) == 0
    assert retry_after_seconds("soon") is None and retry_after_seconds(None) is None


def test_slow_drip_is_bounded_by_the_total_deadline(server):
    t0 = time.monotonic()
    with pytest.raises(ImageError, match=r"over the 2s total deadline") as e:
        fetch_image(f"{server.url}/drip/ok.png", policy(read_timeout=5, total_timeout=2, retries=2))
    assert time.monotonic() - t0 < 5  # not the read timeout: every byte came within it
    assert "reading the body" in str(e.value) and not e.value.transient
    assert server.hits["/drip/ok.png"] == 1  # not retried


def test_backoff_stays_within_the_deadline(server):
    waits = []
    with pytest.raises(ImageError, match=r"HTTP 500 .*no time left for a retry within the 0.5s total deadline"):
        fetch_image(f"{server.url}/flaky/f3.png", policy(retries=3, backoff=10, total_timeout=0.5), sleep=waits.append)
    assert waits == [] and server.hits["/flaky/f3.png"] == 1


# HTTPS: SNI and certificate checks, pooled


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    pytest.importorskip("cryptography")
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    d = tmp_path_factory.mktemp("tls")
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(1)
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(2)
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    (d / "ca.pem").write_bytes(ca.public_bytes(pem))
    (d / "cert.pem").write_bytes(cert.public_bytes(pem))
    (d / "key.pem").write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return d


@pytest.fixture
def tls_server(root, tls_files):
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tls_files / "cert.pem", tls_files / "key.pem")
    srv = ImageServer(root, tls=ctx)
    yield srv
    srv.close()
    close_idle_connections()


def test_https_checks_the_certificate(tls_server):
    url = f"https://localhost:{tls_server.port}/ok.png"
    with pytest.raises(ImageError, match="certificate") as e:  # our test CA is not trusted by default
        fetch_image(url, policy(allowlist=["localhost"], retries=2))
    assert not e.value.transient and tls_server.hits["/ok.png"] == 0


def test_https_pooled_with_sni(tls_server, tls_files, root, monkeypatch):
    import ssl

    client = ssl.create_default_context(cafile=str(tls_files / "ca.pem"))
    monkeypatch.setattr(connections, "_ssl_context", lambda: client)
    url = f"https://localhost:{tls_server.port}/ok.png"
    for _ in range(5):
        assert fetch_image(url, policy(allowlist=["localhost"])) == (root / "ok.png").read_bytes()
    assert tls_server.connections == 1 and tls_server.sni == ["localhost"]
