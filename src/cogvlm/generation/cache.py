"""KV caches, preallocated and written at explicit positions; a step never concatenates over them.

- `KVCache`: (B, Hkv, S_max, K) keys and values per layer for one left-padded batch; every row is
  written at the same columns (`prefill`, `decode_one_token`).
- `SlotCache`: the layout the decode state uses. Per layer (S, Hkv, L, K), reserved once for S
  slots of L tokens. A row owns one slot from its prefill to its end: its prompt is prefilled
  straight into the slot (`rows()` is a view, nothing is copied), each decode step writes its one
  new key and value at the slot's own column `index[s]`, and its end frees the slot in place
  (`free`). Two device tensors describe the slots: `index` (S,), the next column of each slot,
  and `mask` (S, L), the columns each slot attends to (its prompt's unpadded ones, then every
  decoded one). Both are updated on the device, arithmetically, so a step reads nothing back.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from .. import kernels
from ..loading.placement import execution_device
from ..model.decoder import RowIndexedCache

#: The share of a slot in use above which CPU decode steps attend over the whole slot.
WHOLE_SLOT_SHARE = 0.75


class KVCache:
    """Per-layer (keys, values), each (B, Hkv, S_max, K), in the model's dtype and device.

    Each layer's cache lives on that layer's execution device (device maps, offloaded layers).
    The model gets this object, not its list: accelerate's device hooks copy lists of tensors
    to their device, which would send the writes to a copy; an object they leave alone.
    """

    def __init__(self, model: Any, batch: int, max_len: int) -> None:
        self.layers = _allocate(model, batch, max_len)

    @classmethod
    def of(cls, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> "KVCache":
        """A cache over existing tensors (views of a SlotCache's slots): writes land in them."""
        cache = cls.__new__(cls)
        cache.layers = layers
        return cache

    def __getitem__(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.layers[layer]

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only these batch rows (finished rows leave the batch)."""
        self.layers = [(k[rows.to(k.device)], v[rows.to(v.device)]) for k, v in self.layers]


class SlotCache:
    """S slots of L tokens: per layer (S, Hkv, L, K) keys and values, allocated once.

    `index` (S,) int64 and `mask` (S, L) bool live on the token embedding's device; a free slot
    has an empty mask and the index `free` gave it (0 unless told).
    """

    def __init__(self, model: Any, slots: int, length: int) -> None:
        self.slots, self.length = slots, length
        self.layers = _allocate(model, slots, length)
        device = execution_device(model.model.embed_tokens)
        self.index = torch.zeros(slots, dtype=torch.long, device=device)
        self.mask = torch.zeros(slots, length, dtype=torch.bool, device=device)

    @property
    def nbytes(self) -> int:
        """Bytes reserved for keys and values (the index and mask are a rounding error)."""
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.layers)

    def rows(self, start: int, stop: int) -> KVCache:
        """Slots [start, stop) as a batch cache, for prefilling those rows in place."""
        return KVCache.of([(k[start:stop], v[start:stop]) for k, v in self.layers])

    def occupy(self, start: int, attention_mask: torch.Tensor) -> None:
        """After prefilling rows (n, T) into slots [start, start + n): they attend to their
        unpadded prompt columns and write their next token at column T."""
        n, t = attention_mask.shape
        self.mask[start : start + n, :t] = attention_mask.to(self.mask.device, torch.bool)
        self.mask[start : start + n, t:] = False
        self.index[start : start + n] = t

    def free(self, slot: int, scrub: bool = False, park: int = 0) -> None:
        """Free a slot in place. `scrub` zeroes its keys and values too: a row that produced NaN
        or inf may have left them there, and a later row reads the columns it has not written
        yet with weight 0, which NaN would still poison (0 * NaN). `park`: the column a free
        slot's steps write their noise to (a step decodes free slots too)."""
        self.index[slot] = park
        self.mask[slot] = False
        if scrub:
            for k, v in self.layers:
                k[slot].zero_()
                v[slot].zero_()

    def decode_views(self, start: int, stop: int, end: int) -> list[RowIndexedCache]:
        """Per layer, slots [start, stop) over columns [0, end), with their write index and mask:
        what the network needs to decode one token per slot. Views only: nothing is copied on
        one device (across devices, the index and mask follow each layer).

        On the CPU, when `end` covers at least WHOLE_SLOT_SHARE of the slot, the views span the
        whole slot (the mask holds the columns past `end` out): a view that stops short of the
        slot's end is not contiguous, and the CPU matmuls read it 1.5-2x slower (bf16) than a
        contiguous block of the same size."""
        if self.layers and self.layers[0][0].device.type == "cpu" and end >= WHOLE_SLOT_SHARE * self.length:
            end = self.length
        index, mask = self.index[start:stop], self.mask[start:stop, None, None, :end]  # (R,), (R, 1, 1, E)
        return [
            RowIndexedCache(k[start:stop, :, :end], v[start:stop, :, :end], _on(index, k.device), _on(mask, k.device))
            for k, v in self.layers
        ]


def slot_bytes(model: Any, length: int) -> dict[torch.device, int]:
    """Bytes one slot of `length` tokens takes on each device that holds a layer's cache."""
    cfg = model.config
    per_layer = 2 * cfg.num_kv_heads * length * cfg.head_dim * model.model.embed_tokens.weight.element_size()
    sizes: dict[torch.device, int] = {}
    for layer in model.model.layers:
        device = execution_device(layer.input_layernorm)
        sizes[device] = sizes.get(device, 0) + per_layer
    return sizes


#: Share of the free memory the slots may take, and what stays free for one prefill's activations.
FREE_SHARE, PREFILL_RESERVE = 0.9, 2**30


def slots_that_fit(model: Any, length: int, cap: int, keep: int = 0) -> int:
    """How many slots of `length` tokens fit the memory free now (the weights already loaded):
    on each device, (FREE_SHARE x free - PREFILL_RESERVE - keep) // the slot's bytes there; the
    smallest over the devices, at least 1, at most `cap`. Free memory is the CUDA driver's
    `mem_get_info` on a GPU, the system's available memory on the CPU; `keep` is what else will
    be held later (an image cache's most)."""
    fits = cap
    for device, size in slot_bytes(model, length).items():
        room = FREE_SHARE * _free_bytes(device) - PREFILL_RESERVE - keep
        fits = min(fits, int(room // size))
    return max(1, fits)


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        import psutil

        return psutil.virtual_memory().available
    except ImportError:  # psutil comes with accelerate; without it, Linux's count of free pages
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _allocate(model: Any, batch: int, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    cfg = model.config
    shape = (batch, cfg.num_kv_heads, length, cfg.head_dim)  # grouped-query: the KV heads only
    dtype = model.model.embed_tokens.weight.dtype  # quantised weights do not carry the compute dtype
    grouped = cfg.num_attention_heads > cfg.num_kv_heads
    layers = []
    for layer in model.model.layers:
        device = execution_device(layer.input_layernorm)
        layers.append(_layer(shape, dtype, device, grouped))
    return layers


def _stored(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, by_column: bool) -> torch.Tensor:
    """A layer's keys or values, (B, Hkv, L, K); `by_column` (on the CPU only): its memory is
    (B, Hkv, K, L), a transposed view keeping every caller's indexing."""
    if by_column and torch.device(device).type == "cpu":
        b, h, length, k = shape
        return torch.zeros(b, h, k, length, dtype=dtype, device=device).transpose(-1, -2)  # (B, Hkv, L, K) view
    return torch.zeros(shape, dtype=dtype, device=device)


def _layer(
    shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, grouped: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's (keys, values), in the layout a CPU decode step reads fastest (measured on
    bench-490 and bench-cogvlm2-1344, one layer): fp32 values stored by column, so MKL's
    probabilities x values reads rows (2.6 against 1.25 ms at batch 8); bf16 with one query head
    per KV head, values by column too, for `model.decoder.decode_attention`'s compiled reductions
    (1.6 against 2.6-3.1 ms); grouped bf16 heads, which stay eager, keys stored by column, so
    oneDNN's queries x keys reads rows (bench-490's shapes: 2.1-2.2 against 2.8-3.4 ms), except
    where our kernel attends them (`kernels.attends_grouped()`), which reads keys by row and values
    by column. CUDA keeps the plain layout."""
    on_cpu = torch.device(device).type == "cpu"
    eager_grouped = dtype == torch.bfloat16 and grouped and not (on_cpu and kernels.attends_grouped())
    keys = _stored(shape, dtype, device, by_column=eager_grouped)
    values_by_column = dtype == torch.float32 or (dtype == torch.bfloat16 and not eager_grouped)
    return keys, _stored(shape, dtype, device, by_column=values_by_column)


def _on(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The tensor on `device`; itself (no call at all) when it is there already."""
    return tensor if tensor.device == device else tensor.to(device)
