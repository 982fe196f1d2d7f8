"""URL fetching refuses internal addresses (checked before connecting, on every redirect), caps
bytes while streaming, and bounds redirects.  Only loopback servers are contacted: every other
address below is refused before any connection is made."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterator

import pytest

from qwen_edit_worker.pictures.urlfetch import MAX_REDIRECTS, FetchError, FetchPolicy, address_problem, fetch
from routes_server import Routes, serve_routes

POLICY = FetchPolicy(max_bytes=100_000)
LOOPBACK = FetchPolicy(max_bytes=100_000, allow_loopback=True)


@pytest.mark.parametrize(("address", "problem"), [
    ("127.0.0.1", "loopback"), ("::1", "loopback"), ("::ffff:127.0.0.1", "loopback"),
    ("10.1.2.3", "private"), ("172.16.0.9", "private"), ("192.168.1.1", "private"), ("fd00:ec2::254", "private"),
    ("169.254.169.254", "link-local"), ("fe80::1", "link-local"), ("::ffff:169.254.169.254", "link-local"),
    ("0.0.0.0", "unspecified"), ("::", "unspecified"), ("224.0.0.1", "multicast"), ("ff02::1", "multicast"),
    ("100.64.0.1", "not a public"), ("240.0.0.1", "reserved"), ("2002:a00:1::", "private"),  # 6to4 of 10.0.0.1
])
def test_internal_addresses_are_refused(address: str, problem: str) -> None:
    found = address_problem(ipaddress.ip_address(address))
    assert found is not None and problem in found


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8"])
def test_public_addresses_pass(address: str) -> None:
    assert address_problem(ipaddress.ip_address(address)) is None


def test_loopback_only_as_a_test_aid() -> None:
    assert address_problem(ipaddress.ip_address("127.0.0.1"), allow_loopback=True) is None
    assert "private" in address_problem(ipaddress.ip_address("10.0.0.1"), allow_loopback=True)


@pytest.mark.parametrize(("url", "reason"), [
    ("http://169.254.169.254/latest/meta-data/", "link-local (cloud metadata)"),
    ("http://[::ffff:10.0.0.1]/a.png", "private"),
    ("http://localhost:8080/a.png", "loopback"),
    ("http://0.0.0.0/", "unspecified"),
    ("ftp://example.com/a.png", "only http and https"),
    ("http:///nohost", "only http and https"),
])
def test_refused_urls(url: str, reason: str) -> None:
    with pytest.raises(FetchError, match=re.escape(reason)):
        fetch(url, POLICY)


@pytest.fixture(scope="module")
def base() -> Iterator[str]:
    with serve_routes() as url:
        yield url


def test_redirects_are_followed_and_rechecked(base: str) -> None:
    Routes.table["/start"] = (302, {"Location": "/final"}, b"")
    Routes.table["/final"] = (200, {}, b"picture bytes")
    assert fetch(f"{base}/start", LOOPBACK) == b"picture bytes"
    Routes.table["/to-metadata"] = (302, {"Location": "http://169.254.169.254/latest/meta-data/"}, b"")
    with pytest.raises(FetchError, match="169.254.169.254: resolves to a link-local"):
        fetch(f"{base}/to-metadata", LOOPBACK)


def test_redirect_loop_is_bounded(base: str) -> None:
    Routes.table["/loop"] = (301, {"Location": "/loop"}, b"")
    Routes.hits.clear()
    with pytest.raises(FetchError, match=f"more than {MAX_REDIRECTS} redirects"):
        fetch(f"{base}/loop", LOOPBACK)
    assert Routes.hits.count("/loop") == MAX_REDIRECTS + 1


def test_stream_stops_at_the_cap_without_content_length(base: str) -> None:
    Routes.table["/unsized"] = (200, {"Content-Length": "omit"}, b"x" * 250_000)  # body ends at close
    with pytest.raises(FetchError, match="127.0.0.1: the picture is over the 100,000-byte limit"):
        fetch(f"{base}/unsized", LOOPBACK)
    Routes.table["/small-unsized"] = (200, {"Content-Length": "omit"}, b"y" * 5_000)
    assert fetch(f"{base}/small-unsized", LOOPBACK) == b"y" * 5_000
