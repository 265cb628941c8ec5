"""Token generation: a preallocated KV cache, prefill, decode one token, sample.

The cache holds (B, Hkv, S_max, K) keys and values per layer, written at explicit positions; a
step never concatenates over it. Batches are left-padded (pad id, type 0, mask 0); rows that
finish are dropped from the batch so they stop costing compute.
"""

from .cache import KVCache
from .config import GenerationConfig
from .decoder import BatchDecoder
from .generate import generate_sequences
from .sampling import sample
from .step import decode_one_token, prefill

__all__ = ["GenerationConfig", "KVCache", "prefill", "decode_one_token", "sample", "BatchDecoder", "generate_sequences"]
