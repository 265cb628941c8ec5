"""LLaMA decoder layers with visual experts.

Every layer holds two copies of the QKV projection, the attention output projection and the
MLP: the language expert (the original LLM weights) and the vision expert. A boolean mask over
tokens (B, T) routes each token through one of them; with no image, only the language expert
runs, so the decoder is exactly its language model.

Attention is grouped-query: the fused QKV output is `[H, Hkv, Hkv] x K` and query head j reads
key/value head j // (H / Hkv). CogVLM-1 has Hkv = H (plain multi-head attention); CogVLM2 has
H = 4 Hkv and a bias on the vision expert's QKV.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import cpu, kernels
from ..config import ACTIVATIONS, CogVLMConfig

#: A layer's slice of the preallocated KV cache: keys and values, each (B, Hkv, S_max, K), written
#: by every row at the same columns `cache_start..`.
LayerCache = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True, eq=False)
class RowIndexedCache:
    """A layer's cache where each row writes its one new token at its own column (decoding rows
    of different lengths together, each in its own slot).

    keys, values: (B, Hkv, S, K); index: (B,) int64, the column each row's new key and value go
    to; mask: (B, 1, 1, S) bool, the columns each row attends to, its new one included. All on
    the layer's device: the write is a scatter and the mask is given, so nothing is read back
    to the host.
    """

    keys: torch.Tensor
    values: torch.Tensor
    index: torch.Tensor
    mask: torch.Tensor


class RMSNorm(nn.Module):
    """RMSNorm with the official cast order: the weight multiplies the fp32 activations (bf16
    inference on the CPU: the same arithmetic in one of our kernels' calls)."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if kernels.normalises(x, self.weight):  # bf16 inference on the CPU: one call, not nine
            return kernels.rmsnorm(x, self.weight, self.eps)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * x32).to(x.dtype)


def rotary_inv_freq(head_dim: int, dtype: torch.dtype = torch.float32, base: float = 10000.0) -> torch.Tensor:
    """Inverse frequencies, computed in `dtype` as the official code does under that default dtype,
    on the CPU (on the meta device the division would import torch._dynamo), then put on the
    default device."""
    exponent = torch.arange(0, head_dim, 2, device="cpu").to(dtype) / head_dim
    return (1.0 / (torch.tensor(base, dtype=dtype, device="cpu") ** exponent)).to(torch.get_default_device())


class RotaryEmbedding(nn.Module):
    """NeoX-style rotary embedding over the whole head; `inv_freq` is a persistent buffer.

    `base` is config.rope_theta (hard-coded in the official code: 10000 for CogVLM-1, 500000 for
    CogVLM2). A checkpoint's stored `inv_freq` replaces the computed one, as it does there.
    """

    def __init__(self, head_dim: int, base: float) -> None:
        super().__init__()
        self.register_buffer("inv_freq", rotary_inv_freq(head_dim, base=base), persistent=True)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids (B, T) -> cos, sin (B, 1, T, K).

        Positions are cast to inv_freq's dtype first, as the official cache builds its
        `arange` in that dtype (bf16 rounds positions above 256; reproduced on purpose).
        """
        t = position_ids.to(self.inv_freq.dtype)
        freqs = t[..., None] * self.inv_freq  # (B, T, K/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, K)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


def attend_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Attention of one query per row (a decode step) as matmul, softmax, matmul. On the CPU this is
    what suits one query: SDPA's kernel there is built for long queries and is several times slower
    at one (in bf16 about 5x). q (B, H, 1, K); k, v (B, Hkv, S, K); mask (B, 1, 1, S) bool or None.
    Query head j reads KV head j // (H / Hkv), as SDPA's enable_gqa does; softmax in float32."""
    b, h, _, head_dim = q.shape
    hkv = k.shape[1]
    grouped = (q * head_dim**-0.5).reshape(b, hkv, h // hkv, head_dim)  # (B, Hkv, G, K): G heads per KV head
    if k.stride(-2) == 1:  # keys stored as (B, Hkv, K, S) (grouped bf16 heads on the CPU): queries times their rows
        scores = torch.matmul(grouped, k.transpose(-1, -2))  # (B, Hkv, G, S)
    else:  # keys times queries, not queries times keys: the kernel reads key rows in order (2-3x
        # faster in fp32, and it takes a column slice of a slot as it is where the other order copies it)
        scores = torch.matmul(k, grouped.transpose(-1, -2)).transpose(-1, -2)  # (B, Hkv, S, G) -> (B, Hkv, G, S)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)
    if v.stride(-2) == 1:  # values stored as (B, Hkv, K, S) (the fp32 CPU cache): read as rows
        ctx = torch.matmul(v.transpose(-1, -2), probs.transpose(-1, -2)).transpose(-1, -2)  # (B, Hkv, G, K)
    else:
        ctx = torch.matmul(probs, v)  # (B, Hkv, G, K)
    return ctx.reshape(b, h, 1, head_dim)  # (B, H, 1, K)


def attend_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """`attend_one` for one query head per KV head, written as two reductions over contiguous
    memory for inductor to fuse into loops that read each cache once: keys (B, H, S, K) stored by
    row, values (B, H, S, K) stored by column ((B, H, K, S) in memory). Softmax in float32."""
    b, h, _, head_dim = q.shape
    scores = (q.float() * k.float()).sum(-1)[:, :, None] * head_dim**-0.5  # (B, H, 1, S)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    ctx = (probs * v.transpose(-1, -2).float()).sum(-1)  # (B, H, K): values in their memory order
    return ctx.reshape(b, h, 1, head_dim).to(q.dtype)  # (B, H, 1, K)


class _CompiledAttention:
    """`attend_rows` compiled by inductor on first use (shapes dynamic), for bf16 decode steps on
    the CPU, where oneDNN's one-query bf16 matmuls read the caches at a third of the bandwidth.
    Where inductor cannot build it (no C++ compiler, say), `attend_one` serves, with one warning."""

    def __init__(self) -> None:
        self.compiled: Callable | None = None
        self.failed = False

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if self.failed:
            return attend_one(q, k, v, mask)
        if self.compiled is None:
            self.compiled = torch.compile(attend_rows, dynamic=True)
        try:
            return self.compiled(q, k, v, mask)
        except torch._dynamo.exc.BackendCompilerFailed as err:
            self.failed = True
            warnings.warn(f"decode attention runs eagerly: inductor failed ({err.inner_exception})", stacklevel=2)
            return attend_one(q, k, v, mask)


compiled_attention = _CompiledAttention()


def cpu_has_amx() -> bool:
    """Whether the CPU has AMX tiles, with which oneDNN's bf16 matmuls run `attend_one` faster than
    the compiled reductions (a 2-core AMX Xeon, bench-490 bf16 decode steps: batch 8 44-47 against
    51-53 ms, batch 1 even)."""
    return cpu.has("amx_tile")


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """One query per row on the CPU. bf16 inference, keys by row and values by column (the CPU
    cache's layout for it): our kernel where it takes them (`kernels.attends`); else,
    with one query head per KV head, compiled where the CPU has no AMX (bench-490 on an AVX-512
    EPYC, batch 8: 1.6 against 2.6-3.1 ms a layer). The rest, and anything under autograd, eagerly:
    for grouped heads oneDNN's product of G queries and a key block beat the reductions inductor
    wrote for them (bench-cogvlm2-1344: 359 against 278 tokens/s at batch 8)."""
    one_per_kv = q.shape[1] == k.shape[1]
    layout = k.stride(-1) == v.stride(-2) == 1
    if q.dtype == torch.bfloat16 and not torch.is_grad_enabled() and layout:
        if kernels.attends(q, k, v):
            return kernels.attend(q, k, v, mask)
        if one_per_kv and not cpu_has_amx():
            return compiled_attention(q, k, v, mask)
    return attend_one(q, k, v, mask)


def route(
    x: torch.Tensor,
    vision_mask: torch.Tensor | None,
    language: Callable[[torch.Tensor], torch.Tensor],
    vision: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Apply `vision` to the tokens where vision_mask (B, T) is set and `language` elsewhere."""
    if vision_mask is None:
        return language(x)
    lang = language(x[~vision_mask])  # (N_lang, out)
    vis = vision(x[vision_mask])  # (N_vis, out)
    out = lang.new_empty(x.shape[:-1] + lang.shape[-1:])  # (B, T, out)
    out[~vision_mask] = lang
    out[vision_mask] = vis
    return out


class VisionExpertAttention(nn.Module):
    def __init__(self, config: CogVLMConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        qkv = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        self.rotary_emb = RotaryEmbedding(self.head_dim, config.rope_theta)
        self.vision_expert_query_key_value = nn.Linear(d, qkv, bias=config.vision_expert_qkv_bias)
        self.vision_expert_dense = nn.Linear(d, d, bias=False)
        self.language_expert_query_key_value = nn.Linear(d, qkv, bias=False)
        self.language_expert_dense = nn.Linear(d, d, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        position_ids: torch.Tensor,
        vision_mask: torch.Tensor | None,
        attn_mask: torch.Tensor | None,
        is_causal: bool,
        cache: LayerCache | RowIndexedCache | None = None,
        cache_start: int = 0,
    ) -> torch.Tensor:
        b, t, d = x.shape
        mixed = route(
            x, vision_mask, self.language_expert_query_key_value, self.vision_expert_query_key_value
        )  # (B, T, (H + 2 Hkv) K): Q | K | V
        inv_freq = self.rotary_emb.inv_freq
        if isinstance(cache, RowIndexedCache) and kernels.stores(mixed, inv_freq, cache.keys, cache.values):
            # bf16 decode on the CPU: the rotary embedding and the cache writes below, in one call
            kernels.rope_store(
                mixed, position_ids, inv_freq, cache.keys, cache.values, cache.index, self.num_heads, self.num_kv_heads
            )
            q = mixed[..., :d].view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, 1, K)
            return self._attend(q, cache.keys, cache.values, cache.mask, is_causal, vision_mask)
        kv_width = self.num_kv_heads * self.head_dim
        q, k, v = mixed.split([d, kv_width, kv_width], dim=-1)
        q = q.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, K)
        k = k.view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, K)
        v = v.view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, K)
        cos, sin = self.rotary_emb(position_ids, q.dtype)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if isinstance(cache, RowIndexedCache):  # one token per row, each at its own column
            assert t == 1, "a row-indexed cache takes one new token per row"
            # row r's key and value go to column index[r]: an index_put of (B, Hkv, K), which writes
            # just those (scatter_ on a bf16 CPU tensor rewrites the whole cache: 16 ms a layer at B=8)
            rows = torch.arange(b, device=cache.index.device)
            cache.keys[rows, :, cache.index] = k[:, :, 0].to(cache.keys.dtype)
            cache.values[rows, :, cache.index] = v[:, :, 0].to(cache.values.dtype)
            k, v, attn_mask = cache.keys, cache.values, cache.mask
        elif cache is not None:  # write post-RoPE keys/values at their positions, read the prefix
            cache_k, cache_v = cache
            end = cache_start + t
            cache_k[:, :, cache_start:end] = k
            cache_v[:, :, cache_start:end] = v
            k, v = cache_k[:, :, :end], cache_v[:, :, :end]
            if t > 1:  # SDPA reads keys or values stored (B, Hkv, K, S) 3x slower than a copy
                k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (k, v))
        return self._attend(q, k, v, attn_mask, is_causal, vision_mask)

    def _attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        attn_mask: torch.Tensor | None,
        is_causal: bool,
        vision_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """q (B, H, T, K) over k, v (B, Hkv, S, K), then the experts' output projection -> (B, T, D)."""
        b, _, t, _ = q.shape
        if t == 1 and q.device.type == "cpu":
            ctx = decode_attention(q, k, v, attn_mask)
        else:  # enable_gqa: query head j reads KV head j // (H / Hkv), the grouping of the official code.
            ctx = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=self.num_kv_heads != self.num_heads
            )
        ctx = ctx.transpose(1, 2).reshape(b, t, -1)  # (B, T, D)
        return route(ctx, vision_mask, self.language_expert_dense, self.vision_expert_dense)


class MLP(nn.Module):
    """down(act(gate(x)) * up(x)), act = config.hidden_act (SiLU in every released config)."""

    def __init__(self, config: CogVLMConfig) -> None:
        super().__init__()
        self.hidden_act = config.hidden_act
        self.act_fn = ACTIVATIONS[config.hidden_act]
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class VisionExpertMLP(nn.Module):
    def __init__(self, config: CogVLMConfig) -> None:
        super().__init__()
        self.language_mlp = MLP(config)
        self.vision_mlp = MLP(config)

    def forward(self, x: torch.Tensor, vision_mask: torch.Tensor | None) -> torch.Tensor:
        return route(x, vision_mask, self.language_mlp, self.vision_mlp)


class CogVLMDecoderLayer(nn.Module):
    """Pre-norm LLaMA layer with experts (the official class name, kept whole by device maps)."""

    def __init__(self, config: CogVLMConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = VisionExpertAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = VisionExpertMLP(config)

    def forward(
        self,
        x: torch.Tensor,
        position_ids: torch.Tensor,
        vision_mask: torch.Tensor | None,
        attn_mask: torch.Tensor | None,
        is_causal: bool,
        cache: LayerCache | RowIndexedCache | None = None,
        cache_start: int = 0,
    ) -> torch.Tensor:
        if isinstance(cache, RowIndexedCache) and vision_mask is None and kernels.decodes_from(x):  # a decode step
            fused = self.decode_kernel()
            if fused is not None and kernels.decodes(fused, x, cache.keys, cache.values):
                return kernels.decode_layer(fused, x, position_ids, cache.keys, cache.values, cache.index, cache.mask)
        x = x + self.self_attn(
            self.input_layernorm(x), position_ids, vision_mask, attn_mask, is_causal, cache, cache_start
        )
        return x + self.mlp(self.post_attention_layernorm(x), vision_mask)

    def decode_kernel(self) -> kernels.DecodeLayer | None:
        """The layer's language expert as `kernels.decode_layer` takes it (a bf16 CPU decode step in
        one call: bench-490 on a 2-core CPU spent about 300 us a layer in the 15 modules and ops it
        replaces), None where its FFN's activation is not SiLU. Kept between steps while the layer
        holds the same weights at the same addresses."""
        # nn.Module's attribute lookups cost about 2 us each on a 2-core CPU, a dozen a layer and step:
        # its registries are read directly
        attn, mlp = self._modules["self_attn"], self._modules["mlp"]._modules["language_mlp"]
        if mlp.hidden_act not in ("silu", "swish"):
            return None
        norms = (self._modules[n]._parameters["weight"] for n in ("input_layernorm", "post_attention_layernorm"))
        tensors = (*norms, attn._modules["rotary_emb"]._buffers["inv_freq"])
        products = (
            *(attn._modules[n] for n in ("language_expert_query_key_value", "language_expert_dense")),
            *(mlp._modules[n] for n in ("gate_proj", "up_proj", "down_proj")),
        )
        kept = _decode_kernels.get(self)
        if kept is None or not kept.made_of(tensors, products):
            eps = self._modules["input_layernorm"].eps
            kept = kernels.DecodeLayer(*tensors, products, eps, attn.num_heads, attn.num_kv_heads)
            _decode_kernels[self] = kept
        return kept


#: Each decoder layer's `kernels.DecodeLayer`, made at its first bf16 CPU decode step (kept outside
#: the module, so that copying or saving a model never carries the weights' addresses).
_decode_kernels: weakref.WeakKeyDictionary[CogVLMDecoderLayer, kernels.DecodeLayer] = weakref.WeakKeyDictionary()
