"""Hostile images and image hosts against `caslie_core.images` (no Ray): memory bounded by construction,
only the accepted formats opened, any malformed file an `ImageError`, fetches cancelled from another thread
and bounded by a total deadline whatever the host sends, refusals that do not tell where a name resolves."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest
from hostile import TrickleHost, corpus, eps_file, ico_with_big_png, png16
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from caslie_core.errors import ImageError
from caslie_core.images import FetchCancel, FetchPolicy, address_refusal, decode_image, fetch_image

LOCAL = FetchPolicy(allowlist=["127.0.0.1/32"], retries=0, total_timeout=30, read_timeout=10)

_PEAK = """
import json, resource, sys
sys.path.insert(0, sys.argv[1])
from hostile import png16
data = png16(6324, 6324)
import numpy, PIL.Image
from caslie_core.images import decode_image
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
decode_image(data)
print(json.dumps({"peak_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024}))
"""


def test_a_16_bit_picture_under_the_pixel_cap_decodes_within_a_small_memory_budget():
    """6324x6324 16-bit (40M pixels, 90 KB of PNG): about 1 GB at peak through float64 before; now the
    decoded picture (80 MB) plus small arrays. Measured in a fresh process (peak RSS)."""
    here = str(__import__("pathlib").Path(__file__).parent)
    out = subprocess.run([sys.executable, "-c", _PEAK, here], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["peak_mb"] < 250


def test_only_the_accepted_formats_are_opened():
    for data in (ico_with_big_png(), eps_file()):
        with pytest.raises(ImageError, match="not an image in an accepted format"):
            decode_image(data)


def test_the_memory_budget_is_checked_from_the_header_before_decoding():
    with pytest.raises(ImageError, match="over the 50000000-byte budget"):
        decode_image(png16(6000, 6000), max_decoded_bytes=50_000_000)
    with pytest.raises(ImageError, match="pixel limit"):
        decode_image(png16(7000, 7000))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(sorted(corpus())),
    edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=8),
    cut=st.one_of(st.none(), st.integers(1, 10_000)),
)
def test_a_mangled_file_of_any_accepted_format_decodes_or_is_an_image_error(name, edits, cut):
    data = bytearray(_CORPUS[name])
    for at, value in edits:
        data[at % len(data)] = value
    if cut is not None:
        data = data[: cut % len(data) or 1]
    try:
        out = decode_image(bytes(data), size=32)
    except ImageError as e:
        assert e.stage == "decode"
    else:
        assert out.shape == (32, 32, 3)


_CORPUS = corpus()


@pytest.fixture
def trickle():
    host = TrickleHost(every_s=0.3)
    yield host
    host.close()


def test_a_trickling_host_is_cut_at_the_total_deadline(trickle):
    t = time.monotonic()
    with pytest.raises(ImageError, match="total deadline"):
        fetch_image(f"{trickle.url}/x.png", FetchPolicy(allowlist=["127.0.0.1/32"], retries=3, total_timeout=1.5))
    assert time.monotonic() - t < 5  # the reads each waited less than read_timeout (20 s): the deadline cut them
    assert trickle.wait_closed(5) == 0 and trickle.accepted == 1  # not retried


def test_a_cancel_stops_a_blocked_fetch_at_once_and_closes_its_connection(trickle):
    cancel, errors = FetchCancel(), []

    def fetch():
        try:
            fetch_image(f"{trickle.url}/x.png", LOCAL, cancel=cancel)
        except ImageError as e:
            errors.append(e)

    threads = [threading.Thread(target=fetch) for _ in range(6)]
    for th in threads:
        th.start()
    end = time.monotonic() + 5
    while trickle.open < 6 and time.monotonic() < end:
        time.sleep(0.05)
    assert trickle.open == 6
    cancel.cancel()
    for th in threads:
        th.join(5)
    assert not any(th.is_alive() for th in threads)
    assert len(errors) == 6 and all("cancelled" in e.reason for e in errors)
    assert trickle.wait_closed(5) == 0
    with pytest.raises(ImageError, match="cancelled"):  # a cancelled token refuses new fetches too
        fetch_image(f"{trickle.url}/y.png", LOCAL, cancel=cancel)


def test_what_is_left_of_a_request_bounds_a_fetch(trickle):
    with pytest.raises(ImageError, match="over the 0.8s total deadline"):
        fetch_image(f"{trickle.url}/x.png", LOCAL, timeout=0.8)


@pytest.mark.parametrize(
    "url, why",
    [("http://example.com:99999/x.png", "malformed URL"), ("http://[::1/x", "malformed URL"), ("http:///x", "no host")],
)
def test_malformed_urls_are_image_errors_not_exceptions(url, why):
    with pytest.raises(ImageError, match=why):
        fetch_image(url, FetchPolicy(retries=0))


def test_a_refusal_does_not_tell_the_address_a_name_resolved_to():
    with pytest.raises(ImageError) as e:
        fetch_image("http://localhost:9/x.png", FetchPolicy(retries=0))
    assert "loopback" in e.value.reason and "127.0.0.1" not in e.value.reason and "::1" not in e.value.reason


@pytest.mark.parametrize(
    "ip, fragment",
    [
        ("2002:7f00:1::1", "loopback"),  # 6to4 of 127.0.0.1
        ("2002:a9fe:a9fe::1", "metadata"),  # 6to4 of 169.254.169.254
        ("2002:c0a8:0101::1", "private"),  # 6to4 of 192.168.1.1
        ("fec0::1", "site-local"),
        ("2001:0:4136:e378:8000:63bf:80ff:fffe", "loopback"),  # Teredo, client 127.0.0.1
    ],
)
def test_ipv4_inside_ipv6_and_site_local_are_judged_by_what_they_reach(ip, fragment):
    why = address_refusal(ip)
    assert why is not None and fragment in why
    assert address_refusal("2002:0808:0808::1") is None  # 6to4 of a public address
