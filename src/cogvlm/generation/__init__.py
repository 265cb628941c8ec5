"""Token generation: a preallocated KV cache, prefill, decode one token, sample.

The cache holds (B, Hkv, S_max, K) keys and values per layer, written at explicit positions; a
step never concatenates over it. Batches are left-padded (pad id, type 0, mask 0); rows that
finish are dropped from the batch so they stop costing compute. A seeded, sampled batch draws
row i with seed + i (`row_seeds`); beam search (`beam_search`) scores as transformers' does.
"""

from .cache import KVCache
from .config import GenerationConfig
from .decoder import BatchDecoder
from .generate import generate_sequences
from .sampling import row_seeds, sample
from .search import BeamSettings, Hypothesis, beam_search
from .step import decode_one_token, prefill

__all__ = [
    "GenerationConfig",
    "KVCache",
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
