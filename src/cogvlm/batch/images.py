"""An item's image, read and made small: a file, a member of a shard, or a URL (opt-in, SSRF-safe).

This is the work the model must never wait for, so it runs in worker threads (local runs) or Ray
tasks. The image is decoded with image.py's limits and resized to the model's side here, as
image.preprocess would, so what travels to the model is small and preprocess leaves its size
alone (a resize to the size an image has is a copy). A failure is a `Failure` with one line of
reason, for the errors file, never an exception.

Remote images (http, https, data: URLs) go through the server's fetcher (serve/media.py) with the
same rules: off unless allowed; then only public addresses, checked at every redirect, with size,
pixel and time limits. They need the `serve` extra (httpx).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from PIL import Image

from ..errors import CogVLMError, ImageError
from ..image import load_image
from .sources import Item


@dataclass(frozen=True)
class Prepared:
    """An item's image at the model's side, and the size of the original (for pixel boxes)."""

    item: Item
    image: Image.Image
    width: int
    height: int


@dataclass(frozen=True)
class Failure:
    """An item that could not be read, and why (one line)."""

    item: Item
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"id": self.item.id, "image": self.item.image, "error": self.reason}


def prepare(item: Item, side: int, allow_remote: bool = False) -> Prepared | Failure:
    """Read, decode and resize one item's image; a Failure instead of raising."""
    try:
        image = read(item, allow_remote)
    except ImageError as e:
        return Failure(item, str(e))
    resized = image.resize((side, side), Image.BICUBIC)
    return Prepared(item, resized, image.width, image.height)


def read(item: Item, allow_remote: bool = False) -> Image.Image:
    """The item's image in RGB; ImageError (one line naming the item) when it cannot be had."""
    if item.remote:
        return _fetch(item.image, allow_remote)
    if item.span is None:
        return load_image(item.path)
    offset, size = item.span
    try:
        with open(item.path, "rb") as f:
            f.seek(offset)
            data = f.read(size)
    except OSError as e:
        raise ImageError(f"{item.image}: cannot read the shard ({e.strerror})") from None
    try:
        return load_image(data)
    except ImageError as e:
        raise ImageError(f"{item.image}: {str(e).removeprefix('image bytes: ')}") from None


def _fetch(url: str, allow_remote: bool) -> Image.Image:
    if url.startswith(("http://", "https://")) and not allow_remote:
        raise ImageError(f"{url}: remote images are off (run with --allow-remote-images)")
    try:
        from ..serve.media import MediaPolicy, fetch_image
        from ..serve.protocol import APIError
    except ModuleNotFoundError as e:
        raise CogVLMError(f"remote images need {e.name}: pip install 'cogvlm[serve]'") from None
    try:
        return asyncio.run(fetch_image(url, MediaPolicy(allow_remote=allow_remote)))
    except APIError as e:
        shown = url if len(url) <= 80 else f"{url[:60]}..."
        raise ImageError(f"{shown}: {e}") from None
