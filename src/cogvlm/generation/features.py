"""Image features kept by the pixels they came from, so a picture asked about again (the next turn
of a chat, another question of a batch or an evaluation) goes through the vision tower once.

The key is a digest of the preprocessed pixels (blake2b over their bytes, shape and dtype), so two
requests holding the same picture share an entry however they sent it (path, PIL image, bytes).
Entries stay where the tower put them; past `max_bytes` the least recently used go first. A call
encodes only the pictures it has no entry for, each once however often the batch holds it; with
`max_bytes=0` nothing is kept between calls.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any, Sequence

import torch

#: What a Pipeline keeps by default: 650 of the tiny model's images, 12 of CogVLM's at 490 pixels
#: in bf16 (10 MiB each), 6 of CogVLM2's at 1344.
DEFAULT_MAX_BYTES = 128 * 2**20


def pixel_digest(image: torch.Tensor) -> bytes:
    """A digest of a preprocessed image (3, S, S): equal pixels, shape and dtype, equal digest."""
    pixels = image.detach().to("cpu").contiguous()
    digest = hashlib.blake2b(f"{tuple(pixels.shape)}{pixels.dtype}".encode(), digest_size=20)
    digest.update(pixels.reshape(-1).view(torch.uint8).numpy())
    return digest.digest()


class ImageFeatureCache:
    """`encode_images` with a memory: features by pixel digest, least recently used out past
    `max_bytes`. Not thread-safe: one per model user (a Pipeline, the server's engine)."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0 (got {max_bytes})")
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._entries: OrderedDict[bytes, torch.Tensor] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()
        self.nbytes = 0

    @torch.no_grad()
    def __call__(self, model: Any, images: Sequence[Sequence[torch.Tensor]]) -> torch.Tensor | None:
        """Features (N, G + 2, D) of the per-sample image lists, flattened in order as
        `encode_images` would give them; None when there is no image."""
        flat = [image for sample in images for image in sample]
        if not flat:
            return None
        keys = [pixel_digest(image) for image in flat]
        found = {key: self._entries[key] for key in keys if key in self._entries}
        missing = {key: image for key, image in zip(keys, flat) if key not in found}  # each once
        if missing:
            encoded = model.model.encode_images(torch.stack(list(missing.values())))  # (M, G + 2, D)
            found.update(zip(missing, encoded))
        features = torch.stack([found[key] for key in keys])  # (N, G + 2, D)
        self._keep(found)
        return features

    def _keep(self, found: dict[bytes, torch.Tensor]) -> None:
        """Mark the call's entries as just used and store its new features (own copies, so that
        evicting one frees it); then evict the least recently used past `max_bytes`."""
        for key, value in found.items():
            size = value.numel() * value.element_size()
            if key in self._entries:
                self._entries.move_to_end(key)
            elif size <= self.max_bytes:
                self._entries[key] = value.clone()
                self.nbytes += size
        while self.nbytes > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.nbytes -= evicted.numel() * evicted.element_size()
