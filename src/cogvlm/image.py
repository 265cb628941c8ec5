"""Images in: decode safely (size limits, clear errors), then preprocess as the official code.

Preprocessing is torchvision's Resize((S, S), BICUBIC) on a PIL image (which is PIL's own
bicubic resize, aspect ratio not kept), ToTensor and CLIP normalisation, all in float32.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image

from .errors import ImageError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
#: Decompression-bomb guard, checked from the header before any pixel is decoded.
MAX_PIXELS = 64_000_000

ImageInput = Union[Image.Image, str, Path, bytes, bytearray]


def load_image(source: ImageInput, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """A PIL RGB image from a PIL image, a path or encoded bytes; one-line ImageError otherwise."""
    if isinstance(source, Image.Image):
        return source.convert("RGB")
    name = str(source) if isinstance(source, (str, Path)) else "image bytes"
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise ImageError(f"{path}: no such image file")
        data = path.read_bytes()
    elif isinstance(source, (bytes, bytearray)):
        data = bytes(source)
    else:
        raise ImageError(f"unsupported image type {type(source).__name__} (use a PIL image, path or bytes)")
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > max_pixels:
            raise ImageError(f"{name}: {width}x{height} pixels is over the limit of {max_pixels}")
        image.seek(0)  # animated formats: the first frame
        image.load()
    except ImageError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(f"{name}: not a readable image ({' '.join(str(e).split())[:120]})") from None
    return image.convert("RGB")


def preprocess(image: Image.Image, image_size: int) -> torch.Tensor:
    """PIL image -> float32 (3, S, S): bicubic resize to S x S, /255, CLIP mean/std."""
    resized = image.convert("RGB").resize((image_size, image_size), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(resized, dtype=np.uint8).copy()).permute(2, 0, 1)  # (3, S, S)
    x = x.float().div(255)
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    return (x - mean) / std
