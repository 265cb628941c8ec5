"""image_url -> PIL image: data URLs always, http(s) only when allowed, nothing else.

Every failure is an APIError with a message written here: no exception text, path or address
from PIL, httpx or the OS reaches a client. Decoding runs in a worker thread, off the event loop.

Remote fetching refuses, at every redirect hop, any host that resolves to a non-public address
(loopback, private, link-local and cloud metadata, CGNAT, multicast, reserved, unspecified, and
those embedded in IPv4-mapped, 6to4 and NAT64 IPv6 addresses); the connection goes to the
address that was checked, so a second DNS answer cannot swap it (DNS rebinding).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import socket
from dataclasses import dataclass
from io import BytesIO

import httpx
from PIL import Image

from ..errors import ImageError
from ..image import MAX_PIXELS, load_image
from .protocol import APIError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: Leading bytes of PNG, JPEG and GIF (WebP is RIFF....WEBP).
_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


@dataclass(frozen=True)
class MediaPolicy:
    """Limits on images. `allow_networks` exempts networks from the public-address rule
    (for tests on loopback, or an intranet image host); it is not a command-line flag."""

    allow_remote: bool = False
    max_bytes: int = 10 * 2**20
    max_pixels: int = MAX_PIXELS
    max_side: int = 16384
    timeout_s: float = 5.0
    max_redirects: int = 3
    allow_networks: tuple[str, ...] = ()


def _bad(message: str, status: int = 400, code: str = "invalid_image") -> APIError:
    return APIError(status, message, param="messages", code=code)


async def fetch_image(url: str, policy: MediaPolicy) -> Image.Image:
    """The image an image_url names, decoded to RGB within the policy's limits."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        data = decode_data_url(url, policy.max_bytes)
    elif scheme in ("http", "https") and policy.allow_remote:
        data = await download(url, policy)
    elif scheme in ("http", "https"):
        raise _bad(
            "remote image URLs are disabled on this server (it was started without "
            "--allow-remote-images); send the image as a data: URL",
            code="remote_images_disabled",
        )
    else:
        raise _bad("image_url must be a data: URL (or http(s) when the server allows remote images)")
    return await asyncio.to_thread(decode_image, data, policy)


def decode_data_url(url: str, max_bytes: int) -> bytes:
    """The bytes of `data:image/...;base64,...` (RFC 2397, base64 only), size checked first."""
    header, comma, payload = url[len("data:") :].partition(",")
    if not comma:
        raise _bad("the data URL has no comma before its data")
    media_type, *params = [p.strip().lower() for p in header.split(";")]
    if "base64" not in params:
        raise _bad("data URLs must be base64-encoded (data:image/png;base64,...)")
    if not media_type.startswith("image/"):
        raise _bad("the data URL's media type must be an image type (image/png, image/jpeg, ...)")
    if len(payload) // 4 * 3 > max_bytes:
        raise _bad(f"the image is over the limit of {max_bytes} bytes", status=413, code="image_too_large")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise _bad("the data URL's data is not valid base64") from None


def decode_image(data: bytes, policy: MediaPolicy) -> Image.Image:
    """PNG, JPEG, WebP or GIF (its first frame) bytes -> RGB; size read from the header first."""
    if not (data.startswith(_MAGIC) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")):
        raise _bad("the data is not a PNG, JPEG, WebP or GIF image")
    try:
        with Image.open(BytesIO(data)) as probe:
            width, height = probe.size
    except Image.DecompressionBombError:
        raise _bad("the image has too many pixels") from None
    except Exception:  # PIL raises many types on bad headers; none is shown
        raise _bad("the image could not be decoded (corrupt or truncated data)") from None
    if width * height > policy.max_pixels or max(width, height) > policy.max_side:
        raise _bad(
            f"the image is {width}x{height} pixels; the limit is {policy.max_pixels} pixels "
            f"and {policy.max_side} per side"
        )
    try:
        return load_image(data, max_pixels=policy.max_pixels)
    except ImageError:
        raise _bad("the image could not be decoded (corrupt or truncated data)") from None


def is_public(ip: IPAddress) -> bool:
    """Whether an address is on the public internet, looking inside IPv6 forms that carry IPv4."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            return is_public(embedded)
    return ip.is_global and not (
        ip.is_multicast or ip.is_reserved or ip.is_loopback or ip.is_link_local or ip.is_unspecified or ip.is_private
    )


async def resolve_allowed(host: str, port: int, policy: MediaPolicy) -> str:
    """One address of `host` to connect to; refused when any of its addresses is not allowed."""
    exempt = [ipaddress.ip_network(n) for n in policy.allow_networks]
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        raise _bad("the image URL's host could not be resolved", code="image_fetch_failed") from None
    addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
    if not addresses or not all(is_public(a) or any(a in n for n in exempt) for a in addresses):
        raise _bad("the image URL's host is not a public address", code="image_url_refused")
    return str(addresses[0])


async def download(url: str, policy: MediaPolicy) -> bytes:
    """GET an image over http(s) within the time, size and redirect limits (all answered 400)."""
    try:
        return await asyncio.wait_for(_follow(url, policy), policy.timeout_s)
    except (asyncio.TimeoutError, httpx.TimeoutException):
        raise _bad("fetching the image timed out", code="image_fetch_failed") from None
    except httpx.HTTPError:
        raise _bad("the image could not be fetched", code="image_fetch_failed") from None


async def _follow(url: str, policy: MediaPolicy) -> bytes:
    async with httpx.AsyncClient(follow_redirects=False, trust_env=False, timeout=policy.timeout_s) as client:
        for _ in range(policy.max_redirects + 1):
            target = _parse(url)
            address = await resolve_allowed(target.host, target.port or _PORTS[target.scheme], policy)
            request = client.build_request(
                "GET",
                target.copy_with(host=address),
                headers={"Host": target.netloc.decode("ascii")},
                extensions={"sni_hostname": target.host} if target.scheme == "https" else {},
            )
            response = await client.send(request, stream=True)
            try:
                if not response.is_redirect:
                    return await _read(response, policy.max_bytes)
                url = str(target.join(response.headers.get("location", "")))
            finally:
                await response.aclose()
    raise _bad(f"the image URL redirects more than {policy.max_redirects} times", code="image_fetch_failed")


_PORTS = {"http": 80, "https": 443}


def _parse(url: str) -> httpx.URL:
    try:
        target = httpx.URL(url)
    except (httpx.InvalidURL, ValueError):
        raise _bad("the image URL is not a valid URL") from None
    if target.scheme not in _PORTS or not target.host:
        raise _bad("image URLs must be http(s) URLs with a host", code="image_url_refused")
    return target


async def _read(response: httpx.Response, max_bytes: int) -> bytes:
    if response.status_code != 200:
        raise _bad(f"the image URL answered HTTP {response.status_code}", code="image_fetch_failed")
    kind = response.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind and not (kind.startswith("image/") or kind == "application/octet-stream"):
        raise _bad("the image URL did not answer with an image", code="image_fetch_failed")
    data = bytearray()
    async for chunk in response.aiter_bytes():
        data += chunk
        if len(data) > max_bytes:
            raise _bad(f"the remote image is over the limit of {max_bytes} bytes", code="image_too_large")
    return bytes(data)
