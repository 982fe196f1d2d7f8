"""Fetching a picture from an http(s) URL without letting the URL reach inside the network.

Why this exists: a public endpoint gets URLs chosen by strangers, and a worker that fetches
whatever it is given can be pointed at the cloud's metadata service or private hosts (SSRF).
Every hop is checked before connecting: the scheme is http or https, the host resolves only to
global addresses (no loopback, private, link-local, metadata, multicast, reserved or unspecified
address, IPv4 or IPv6, IPv4-mapped forms unwrapped), and the connection goes to the address that
was checked, so a DNS answer cannot change between the check and the connect.  Redirects are
followed by hand (at most MAX_REDIRECTS), each re-checked.  Reading stops at the byte cap and at
the total deadline.  Errors name the host and the reason, never the body.  `fetch` returns the
bytes (pictures); `fetch_to_file` streams them into an open file (LoRAs, up to gigabytes).
"""

from __future__ import annotations

import ipaddress
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO
from urllib.parse import urljoin, urlsplit

import certifi
import urllib3

CONNECT_TIMEOUT_S = 5.0
TOTAL_TIMEOUT_S = 20.0
MAX_REDIRECTS = 3
CHUNK = 64 * 1024
USER_AGENT = "qwen-edit-worker/0.1 (+image fetch)"
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class FetchError(Exception):
    """A URL could not be fetched; the message names the host and the reason."""


@dataclass(frozen=True)
class FetchPolicy:
    max_bytes: int
    allow_loopback: bool = False  # a test aid: lets a server on 127.0.0.1 play the remote host
    limit_setting: str = "MAX_INPUT_BYTES"  # named in the over-the-cap error
    what: str = "picture"
    total_timeout_s: float = TOTAL_TIMEOUT_S
    accept: str = "image/*"


def address_problem(address: Address, allow_loopback: bool = False) -> str | None:
    """Why an address must not be fetched from, or None when it is a global unicast address."""
    if isinstance(address, ipaddress.IPv6Address):
        mapped = address.ipv4_mapped or address.sixtofour or (address.teredo[1] if address.teredo else None)
        if mapped is not None:
            return address_problem(mapped, allow_loopback)
    if address.is_loopback:
        return None if allow_loopback else "a loopback address"
    for label, flag in (("unspecified", address.is_unspecified), ("link-local (cloud metadata)", address.is_link_local),
                        ("multicast", address.is_multicast), ("reserved", address.is_reserved),
                        ("private", address.is_private)):
        if flag:
            return f"a {label} address"
    return None if address.is_global else "not a public address"


def fetch(url: str, policy: FetchPolicy) -> bytes:
    """GET `url` following up to MAX_REDIRECTS checked redirects; return at most policy.max_bytes."""
    chunks: list[bytes] = []
    _get(url, policy, chunks.append)
    return b"".join(chunks)


def fetch_to_file(url: str, policy: FetchPolicy, out: BinaryIO) -> int:
    """GET `url` like `fetch`, writing the body to `out` as it arrives; return the bytes written."""
    return _get(url, policy, out.write)


def _get(url: str, policy: FetchPolicy, sink: Callable[[bytes], object]) -> int:
    deadline = time.monotonic() + policy.total_timeout_s
    for _ in range(MAX_REDIRECTS + 1):
        parts = urlsplit(url)
        host = parts.hostname or ""
        if parts.scheme not in ("http", "https") or not host:
            raise FetchError(f"{host or url[:40]}: only http and https URLs with a host are allowed")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        address = _checked_address(host, port, policy.allow_loopback)
        response = _connect(parts.scheme, host, port, address, parts, deadline, policy.accept)
        try:
            if response.status in (301, 302, 303, 307, 308):
                location = response.headers.get("Location")
                if not location:
                    raise FetchError(f"{host}: redirect without a Location")
                url = urljoin(url, location)
                continue
            if response.status != 200:
                raise FetchError(f"{host}: HTTP {response.status}")
            return _read_capped(response, host, policy, deadline, sink)
        finally:
            response.release_conn()
    raise FetchError(f"{host}: more than {MAX_REDIRECTS} redirects")


def _checked_address(host: str, port: int, allow_loopback: bool) -> Address:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise FetchError(f"{host}: the host name does not resolve") from None
    addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
    for address in addresses:  # every answer must be acceptable, not just the first
        problem = address_problem(address, allow_loopback)
        if problem:
            raise FetchError(f"{host}: resolves to {problem}, which this worker does not fetch from")
    return addresses[0]


def _connect(scheme: str, host: str, port: int, address: Address, parts: object, deadline: float,
             accept: str = "image/*") -> urllib3.BaseHTTPResponse:
    remaining = max(0.1, deadline - time.monotonic())
    timeout = urllib3.Timeout(connect=min(CONNECT_TIMEOUT_S, remaining), read=remaining)
    target = str(address)
    if scheme == "https":
        pool: urllib3.HTTPConnectionPool = urllib3.HTTPSConnectionPool(
            target, port, timeout=timeout, retries=False, server_hostname=host, assert_hostname=host,
            cert_reqs="CERT_REQUIRED", ca_certs=certifi.where())
    else:
        pool = urllib3.HTTPConnectionPool(target, port, timeout=timeout, retries=False)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")  # type: ignore[attr-defined]
    default_port = (scheme == "https" and port == 443) or (scheme == "http" and port == 80)
    headers = {"Host": host if default_port else f"{host}:{port}", "User-Agent": USER_AGENT, "Accept": accept}
    try:
        return pool.urlopen("GET", path, headers=headers, redirect=False, preload_content=False,
                            assert_same_host=False)
    except urllib3.exceptions.HTTPError as err:
        reason = type(getattr(err, "reason", None) or err).__name__
        raise FetchError(f"{host}: connection failed ({reason})") from None


def _read_capped(response: urllib3.BaseHTTPResponse, host: str, policy: FetchPolicy, deadline: float,
                 sink: Callable[[bytes], object]) -> int:
    max_bytes, what, setting = policy.max_bytes, policy.what, policy.limit_setting
    declared = response.headers.get("Content-Length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise FetchError(f"{host}: the {what} is {int(declared):,} bytes, over the {max_bytes:,}-byte limit "
                         f"({setting})")
    size = 0
    try:
        for chunk in response.stream(CHUNK):
            size += len(chunk)
            if size > max_bytes:
                raise FetchError(f"{host}: the {what} is over the {max_bytes:,}-byte limit ({setting})")
            if time.monotonic() > deadline:
                raise FetchError(f"{host}: the download took longer than {policy.total_timeout_s:.0f} s")
            sink(chunk)
    except urllib3.exceptions.HTTPError as err:
        raise FetchError(f"{host}: the download broke off ({type(err).__name__})") from None
    if declared and declared.isdigit() and size < int(declared):
        raise FetchError(f"{host}: the download broke off after {size:,} of {int(declared):,} bytes")
    return size
