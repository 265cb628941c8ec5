"""Token generation: a preallocated KV cache, prefill, decode one token, sample.

`KVCache` holds (B, Hkv, S_max, K) keys and values per layer for one prefill, written at explicit
positions; a step never concatenates over it. `SlotCache` reserves (slots, Hkv, L, K) once: a row
is prefilled into a free slot, decodes at its own write index and frees its slot in place;
`DecodeState` is the bookkeeping both `BatchDecoder` (generate, Pipeline) and the server drive;
`ImageFeatureCache` encodes each picture once across their calls, and rows of a batch that ask about
one picture share its [BOS, image] prefill (`DecodeState.admit(..., share_prefix=True)`).
A seeded, sampled batch draws row i with seed + i (`row_seeds`); beam search (`beam_search`)
scores as transformers' does.
"""

from typing import TYPE_CHECKING

from ..lazy import lazy_names
from .config import GenerationConfig

if TYPE_CHECKING:
    from .cache import KVCache, SlotCache
    from .decoder import BatchDecoder, DecodeState
    from .features import ImageFeatureCache
    from .generate import generate_sequences
    from .sampling import row_seeds, sample
    from .search import BeamSettings, Hypothesis, beam_search
    from .step import decode_one_token, prefill

#: The names whose modules import torch, imported on first use (the CLI checks settings without torch).
_LAZY = {
    "KVCache": "cache",
    "SlotCache": "cache",
    "BatchDecoder": "decoder",
    "DecodeState": "decoder",
    "ImageFeatureCache": "features",
    "generate_sequences": "generate",
    "row_seeds": "sampling",
    "sample": "sampling",
    "BeamSettings": "search",
    "Hypothesis": "search",
    "beam_search": "search",
    "decode_one_token": "step",
    "prefill": "step",
}
__getattr__, __dir__ = lazy_names(__name__, _LAZY, globals())

__all__ = [
    "GenerationConfig",
    "KVCache",
    "SlotCache",
    "DecodeState",
    "ImageFeatureCache",
    "prefill",
    "decode_one_token",
    "sample",
    "row_seeds",
    "BatchDecoder",
    "generate_sequences",
    "BeamSettings",
    "Hypothesis",
    "beam_search",
]
