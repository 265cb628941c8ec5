"""Our bf16 kernels for decoding on the CPU: a few rows times a weight, one query's attention, and
a layer's small steps (RMSNorm; a decode step's rotary embedding and cache writes), each one call
where PyTorch takes a dozen ops of a few microseconds.

On a 2-core AVX-512 / AMX Xeon, oneDNN's and PyTorch's bf16 one-row kernels read a decoder-sized
weight at 14-18 GB/s where MKL's fp32 `mv` reads 24-27 GB/s (benchmarks/RESULTS.md, issue 19),
and a bf16 decode step is bound by those reads. `kernels.c` reads a weight in its own packed
layout at 21-27 GB/s from 1 row (`vdpbf16ps`) to 32 rows (AMX, where the CPU has it), and a decode
step's keys and values once each, in the order the CPU cache stores them. On a CPU with AVX2 and
FMA but no AVX512-BF16 (where oneDNN has no bf16 at all and PyTorch's bf16 product costs one pass
over the weight per row), the same kernels are built in fp32 arithmetic on the widened bf16.

It is built with the system C compiler on first use, cached under `$XDG_CACHE_HOME/cogvlm/kernels`
(written atomically) and loaded with ctypes; its OpenMP threads are PyTorch's own (the process has
one libgomp). Where the CPU has neither, there is no compiler, or `COGVLM_CPU_KERNELS=0`,
`available()` is False and callers keep PyTorch's kernels.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shlex
import subprocess
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import cpu
from .fileio import atomic_write

SOURCE = Path(__file__).with_name("kernels.c")
ISA_FLAGS = {  # by the instruction set built for (`_isa`)
    "avx512_bf16": ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mamx-tile", "-mamx-bf16")
    + ("-mavx2", "-mfma"),  # the 8-lane helpers both builds share
    "avx2": ("-mavx2", "-mfma"),
}
FLAGS = ("-O3", "-fopenmp", "-shared", "-fPIC")
BLOCK, DEPTH = 16, 32  # outputs per packed chunk; inputs per AMX tile row (K must be a multiple)
MAX_ROWS = {"amx": 128, "avx512_bf16": 32, "avx2": 512}  # rows up to which the kernel beats the alternative


def _isa() -> str | None:
    """The instruction set our kernels are built for on this CPU, None where neither serves."""
    return "avx512_bf16" if cpu.has("avx512_bf16") else "avx2" if cpu.has("avx2_fma") else None


def cache_folder() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cogvlm" / "kernels"


@functools.cache
def _library() -> tuple[ctypes.CDLL, str] | None:
    """The built kernels (built now if not cached) and what serves: "amx", "avx512_bf16" or
    "avx2"; None (with one warning where the build failed) where they do not run."""
    isa = _isa()
    if os.environ.get("COGVLM_CPU_KERNELS", "1") == "0" or isa is None:
        return None
    source = SOURCE.read_bytes()
    compiler = os.environ.get("CC", "cc")
    flags = (*FLAGS, *ISA_FLAGS[isa])
    digest = hashlib.sha256(source + " ".join((compiler, *flags)).encode()).hexdigest()[:16]
    built = cache_folder() / f"kernels-{digest}.so"
    try:
        if not built.exists():
            built.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(built, lambda tmp: _compile(compiler, flags, tmp))
        lib = ctypes.CDLL(str(built))
    except (OSError, subprocess.SubprocessError) as err:
        warnings.warn(f"bf16 CPU kernels not built ({err}); PyTorch's serve instead", stacklevel=3)
        return None
    pointer, size = ctypes.c_void_p, ctypes.c_long
    row_kernels = (lib.cogvlm_rows_bf16, lib.cogvlm_rows_bf16_amx) if isa == "avx512_bf16" else (lib.cogvlm_rows_bf16,)
    for kernel in row_kernels:
        kernel.argtypes = [pointer, size, pointer, pointer, pointer, size, size]
        kernel.restype = ctypes.c_int
    lib.cogvlm_attend_bf16.argtypes = [pointer, pointer, size, size, pointer, size, size, size, pointer, size]
    lib.cogvlm_attend_bf16.argtypes += [pointer, size, size, size, size, size, ctypes.c_float]
    lib.cogvlm_attend_bf16.restype = ctypes.c_int
    lib.cogvlm_rmsnorm_bf16.argtypes = [pointer, pointer, pointer, size, size, ctypes.c_float]
    lib.cogvlm_rmsnorm_bf16.restype = None
    strides = ctypes.POINTER(ctypes.c_long)
    lib.cogvlm_rope_store_bf16.argtypes = [pointer, size, size, size, size, size, pointer, pointer, ctypes.c_int]
    lib.cogvlm_rope_store_bf16.argtypes += [pointer, pointer, strides, pointer, strides]
    lib.cogvlm_rope_store_bf16.restype = None
    lib.cogvlm_decode_layer_bf16.argtypes = [pointer, pointer, pointer, size, size, pointer, pointer]
    lib.cogvlm_decode_layer_bf16.argtypes += [pointer, strides, pointer, strides, pointer, size, size, ctypes.c_int]
    lib.cogvlm_decode_layer_bf16.restype = ctypes.c_int
    # _init_amx: Linux's leave to use the tiles
    amx = isa == "avx512_bf16" and cpu.has("amx_tile") and torch.cpu._init_amx()
    return lib, "amx" if amx else isa


def _compile(compiler: str, flags: tuple[str, ...], out: str) -> None:
    command = [*shlex.split(compiler), *flags, str(SOURCE), "-o", out]  # $CC may carry options
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    if done.returncode:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise subprocess.SubprocessError(f"{compiler} failed: {last}")


def available() -> bool:
    """Whether our kernels run here (builds them on the first call)."""
    return _library() is not None


def fits(weight: torch.Tensor) -> bool:
    """A bf16 weight (O, K) the row kernels take: O a multiple of 16, K of 32."""
    out_features, in_features = weight.shape
    return weight.dtype == torch.bfloat16 and out_features % BLOCK == 0 and in_features % DEPTH == 0


def max_rows() -> int:
    """Rows up to which `rows` is faster than oneDNN (or, on AVX2, fp32) on the weight unpacked
    (each call's unpacking copies the weight: 1.7-2 ms for 6 MB)."""
    built = _library()
    return 0 if built is None else MAX_ROWS[built[1]]


def pack(weight: torch.Tensor) -> torch.Tensor:
    """(O, K) -> the row kernels' layout (O/16, K/2, 16, 2), contiguous."""
    out_features, in_features = weight.shape
    return weight.reshape(out_features // BLOCK, BLOCK, in_features // 2, 2).transpose(1, 2).contiguous()


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """The layout back to the (O, K) weight, a new contiguous tensor."""
    blocks, pairs = packed.shape[:2]
    return packed.transpose(1, 2).reshape(blocks * BLOCK, pairs * 2)


def rows(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """(..., K) bf16 rows times the packed (O, K) weight (+ bias), fp32 sums rounded to bf16 -> (..., O)."""
    built = _library()
    assert built is not None, "rows() called where available() is False"
    lib, isa = built
    one_row = x.numel() == packed.shape[1] * 2
    return _product(lib.cogvlm_rows_bf16_amx if isa == "amx" and not one_row else lib.cogvlm_rows_bf16, x, packed, bias)


def _product(kernel: Any, x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`rows` through the given one of kernels.c's row functions."""
    blocks, pairs = packed.shape[:2]
    flat = x.reshape(-1, pairs * 2).contiguous()  # (M, K)
    out = torch.empty(flat.shape[0], blocks * BLOCK, dtype=torch.bfloat16)  # (M, O)
    failed = kernel(
        flat.data_ptr(),
        flat.shape[0],
        packed.data_ptr(),
        None if bias is None else bias.data_ptr(),
        out.data_ptr(),
        blocks * BLOCK,
        pairs * 2,
    )
    if failed:
        raise MemoryError(f"bf16 row product: no memory to widen {flat.shape[0]} rows")
    return out.view(*x.shape[:-1], blocks * BLOCK)


def attends_grouped() -> bool:
    """Whether `attend` serves grouped heads (several query heads per KV head) here: where built for
    AVX2, whose oneDNN has no bf16 (bench-cogvlm2-1344 bf16 on a 2-core EPYC: batch 1 21-25 -> 54-63
    tokens/s, batch 8 34-39 -> 210-219). Where the CPU has AVX512-BF16, oneDNN's product of a group's
    queries and a key block serves, as measured there before."""
    built = _library()
    return built is not None and built[1] == "avx2"


def attends(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether `attend` takes these: bf16, one query, one query head per KV head (or whole groups,
    where `attends_grouped()`), keys stored by row and values by column (the bf16 CPU cache's
    layout), head size a multiple of 16."""
    shapes = q.shape[2] == 1 and _attention_takes(q.shape[1], q.shape[-1], k, v)
    return q.dtype == torch.bfloat16 and shapes and available()


def _attention_takes(heads: int, head_dim: int, k: torch.Tensor, v: torch.Tensor) -> bool:
    """`attend`'s demands on the heads and the cache: see `attends`."""
    layout = k.stride(-1) == 1 and k.stride(-2) == head_dim and v.stride(-2) == 1
    grouped = heads == k.shape[1] or (heads % k.shape[1] == 0 and attends_grouped())
    return k.dtype == v.dtype == torch.bfloat16 and layout and grouped and head_dim % BLOCK == 0


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """A decode step's attention where `attends(q, k, v)`: q (B, H, 1, D); k, v (B, Hkv, S, D), query
    head j reading KV head j // (H / Hkv); mask (B, 1, 1, S) bool or None -> (B, H, 1, D). Reads each
    key and value once per query head, in memory order."""
    built = _library()
    assert built is not None, "attend() called where available() is False"
    b, h, _, head_dim = q.shape
    length = k.shape[2]
    query = q.contiguous()
    keep = None if mask is None else mask.expand(b, 1, 1, length).reshape(b, length).contiguous()  # (B, S)
    out = torch.empty(b, h, 1, head_dim, dtype=torch.bfloat16)
    failed = built[0].cogvlm_attend_bf16(
        query.data_ptr(),
        k.data_ptr(),
        k.stride(0),
        k.stride(1),
        v.data_ptr(),
        v.stride(0),
        v.stride(1),
        v.stride(3),
        None if keep is None else keep.data_ptr(),
        length,
        out.data_ptr(),
        b,
        h,
        h // k.shape[1],
        length,
        head_dim,
        head_dim**-0.5,
    )
    if failed:
        raise MemoryError(f"decode attention: no memory for {length} scores a thread")
    return out


def _cpu_bf16(*tensors: torch.Tensor) -> bool:
    """bf16 CPU tensors outside autograd, where our kernels are built."""
    plain = all(t.dtype == torch.bfloat16 and t.device.type == "cpu" for t in tensors)
    return plain and not torch.is_grad_enabled() and available()


def decodes_from(x: torch.Tensor) -> bool:
    """Whether a decode step's hidden states x may go to `decode_layer` (bf16 on the CPU outside
    autograd, where our kernels run): the first of `decodes`' checks, before a layer is looked at."""
    return _cpu_bf16(x)


def normalises(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `rmsnorm` takes these: bf16 rows and weight on the CPU, outside autograd."""
    return _cpu_bf16(x, weight)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`RMSNorm.forward` in one call where `normalises(x, weight)`: (..., D) -> (..., D) bf16."""
    built = _library()
    assert built is not None, "rmsnorm() called where available() is False"
    flat = x.reshape(-1, x.shape[-1]).contiguous()  # (M, D)
    out = torch.empty_like(flat)
    built[0].cogvlm_rmsnorm_bf16(flat.data_ptr(), weight.contiguous().data_ptr(), out.data_ptr(), *flat.shape, eps)
    return out.view(x.shape)


#: The longest head `rope_store` takes (its per-row tables are on the stack).
MAX_HEAD_DIM = 1024


def stores(qkv: torch.Tensor, inv_freq: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> bool:
    """Whether `rope_store` takes these: one new token per row, its fused QKV (B, 1, W) contiguous,
    bf16 on the CPU outside autograd, as the cache; inv_freq fp32 or bf16; an even head of at most
    MAX_HEAD_DIM."""
    head_dim = 2 * inv_freq.shape[0]
    shapes = qkv.dim() == 3 and qkv.shape[1] == 1 and qkv.is_contiguous() and head_dim <= MAX_HEAD_DIM
    freq = inv_freq.dtype in (torch.float32, torch.bfloat16) and inv_freq.device.type == "cpu"
    return shapes and freq and _cpu_bf16(qkv, keys, values)


def rope_store(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    index: torch.Tensor,
    heads: int,
    kv_heads: int,
) -> None:
    """Where `stores(...)`: rotate the query and key heads of each row's new token (qkv (B, 1, W):
    Q | K | V) in place by its position (B, 1), as `apply_rotary` does in bf16, and write its key
    and value at column index[b] of keys, values (B, Hkv, S, K) (any strides). One call for what
    is otherwise a dozen per layer."""
    built = _library()
    assert built is not None, "rope_store() called where available() is False"
    b, _, width = qkv.shape
    where = positions.reshape(b).to(torch.int64).contiguous()
    columns = index.to(torch.int64).contiguous()
    freq = inv_freq.contiguous()
    built[0].cogvlm_rope_store_bf16(
        qkv.data_ptr(),
        b,
        width,
        heads,
        kv_heads,
        2 * freq.shape[0],
        where.data_ptr(),
        freq.data_ptr(),
        int(freq.dtype == torch.bfloat16),
        columns.data_ptr(),
        keys.data_ptr(),
        (ctypes.c_long * 4)(*keys.stride()),
        values.data_ptr(),
        (ctypes.c_long * 4)(*values.stride()),
    )


class PackedRows(torch.nn.Module):
    """A linear layer whose `weight` is in the row kernels' layout (`pack`) and whose `bias` is bf16
    or None (`loading.packing.RowLinear`): what `decode_layer` reads."""

    weight: torch.Tensor
    bias: torch.Tensor | None


class _Layer(ctypes.Structure):
    """kernels.c's `cogvlm_layer`: a decoder layer's weights by address."""

    _fields_ = [
        *((name, ctypes.c_void_p) for name in ("input_norm", "post_norm", "qkv", "dense", "gate", "up", "down")),
        ("inv_freq", ctypes.c_void_p),
        *((name, ctypes.c_long) for name in ("inv_bf16", "heads", "kv_heads", "head_dim", "inter")),
        ("eps", ctypes.c_float),
        ("scale", ctypes.c_float),
    ]


@dataclass(frozen=True, eq=False)
class DecodeLayer:
    """A decoder layer as `decode_layer` takes it: its two RMSNorm weights (D,) and epsilon, the
    rotary inverse frequencies, its language expert's products (QKV, dense, gate, up, down), and its
    heads (`heads` query heads over `kv_heads` key/value heads), with SiLU as the FFN's activation."""

    input_norm: torch.Tensor
    post_norm: torch.Tensor
    inv_freq: torch.Tensor
    products: tuple[torch.nn.Module, ...]
    eps: float
    heads: int
    kv_heads: int

    def __post_init__(self) -> None:
        self._addresses  # noqa: B018  (read now: the addresses at construction)

    def made_of(self, tensors: tuple[torch.Tensor, ...], products: tuple[torch.nn.Module, ...]) -> bool:
        """Whether this holds these norms and frequencies (`tensors`) and products, at the addresses
        it read (a module cast or moved since, or a deep copy, gives new ones)."""
        held = (self.input_norm, self.post_norm, self.inv_freq, *self.products)
        same = all(a is b for a, b in zip(held, (*tensors, *products)))
        return same and self._addresses == _addresses(tensors, products)

    @functools.cached_property
    def _addresses(self) -> tuple[int | None, ...]:
        return _addresses((self.input_norm, self.post_norm, self.inv_freq), self.products)

    @functools.cached_property
    def weights(self) -> _Layer | None:
        """The weights by address for kernels.c, or None where `decode_layer` does not take them: a
        product not packed for the row kernels or with a bias, a norm not bf16 on the CPU, the
        frequencies neither fp32 nor bf16 on the CPU, heads not of whole 16s up to MAX_HEAD_DIM."""
        head_dim = self.input_norm.shape[0] // self.heads
        packed = all(isinstance(p, PackedRows) and p.bias is None for p in self.products)
        freq = self.inv_freq.dtype in (torch.float32, torch.bfloat16) and self.inv_freq.device.type == "cpu"
        norms = all(n.dtype == torch.bfloat16 and n.device.type == "cpu" for n in (self.input_norm, self.post_norm))
        heads = head_dim * self.heads == self.input_norm.shape[0] and head_dim % BLOCK == 0 and head_dim <= MAX_HEAD_DIM
        contiguous = all(t.is_contiguous() for t in (self.input_norm, self.post_norm, self.inv_freq))
        if not (packed and freq and norms and heads and contiguous and None not in self._addresses):
            return None
        qkv, dense, gate, up, down = (p.weight for p in self.products)
        return _Layer(
            *(t.data_ptr() for t in (self.input_norm, self.post_norm, qkv, dense, gate, up, down, self.inv_freq)),
            int(self.inv_freq.dtype == torch.bfloat16),
            self.heads,
            self.kv_heads,
            head_dim,
            gate.shape[0] * BLOCK,
            self.eps,
            head_dim**-0.5,
        )


def _addresses(tensors: tuple[torch.Tensor, ...], products: tuple[torch.nn.Module, ...]) -> tuple[int | None, ...]:
    """Where each tensor, and each product's weight, lies: None for one that is not a plain CPU
    tensor (on the meta device while offloaded, on a GPU, quantised)."""
    weights = (getattr(p, "weight", None) for p in products)
    return tuple(
        t.data_ptr() if type(getattr(t, "data", None)) is torch.Tensor and t.device.type == "cpu" else None
        for t in (*tensors, *weights)
    )


def decodes(layer: DecodeLayer, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> bool:
    """Whether `decode_layer` takes these: the layer's weights (`DecodeLayer.weights`); one new token
    per row (x (B, 1, D) contiguous, B within the row kernels' rows), x and the cache bf16 on the
    CPU outside autograd, the cache as `attend` reads it."""
    shapes = x.dim() == 3 and x.shape[1] == 1 and x.is_contiguous() and x.shape[0] <= max_rows()
    if not (shapes and layer.weights is not None and x.shape[-1] == layer.input_norm.shape[0]):
        return False
    return _attention_takes(layer.heads, layer.weights.head_dim, keys, values) and _cpu_bf16(x, keys, values)


def decode_layer(
    layer: DecodeLayer,
    x: torch.Tensor,
    positions: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    index: torch.Tensor,
    mask: torch.Tensor,
) -> torch.Tensor:
    """Where `decodes(layer, x, keys, values)`: the layer's decode step in one call. x (B, 1, D) at
    positions (B, 1); row b's key and value written at column index[b] of keys, values (B, Hkv, S, K);
    mask (B, 1, 1, S) bool, the columns each row attends to -> (B, 1, D). The same kernels as the
    layer's modules run one by one, in the same order (SiLU's exp is the C library's, not PyTorch's:
    an output can differ from theirs by one bf16 step)."""
    built = _library()
    assert built is not None, "decode_layer() called where available() is False"
    lib, isa = built
    b, _, d = x.shape
    # every tensor whose address goes to C is held by a name until the call returns
    where = positions.reshape(b).to(torch.int64).contiguous()
    columns = index.to(torch.int64).contiguous()
    keep = mask.reshape(b, mask.shape[-1])  # (B, S): a view of the slots' mask
    keep = keep if keep.stride(-1) == 1 else keep.contiguous()
    out = torch.empty_like(x)
    failed = lib.cogvlm_decode_layer_bf16(
        ctypes.byref(layer.weights),
        x.data_ptr(),
        out.data_ptr(),
        b,
        d,
        where.data_ptr(),
        columns.data_ptr(),
        keys.data_ptr(),
        (ctypes.c_long * 4)(*keys.stride()),
        values.data_ptr(),
        (ctypes.c_long * 4)(*values.stride()),
        keep.data_ptr(),
        keep.stride(0),
        keys.shape[2],
        int(isa == "amx"),
    )
    if failed:
        raise MemoryError(f"bf16 decode layer: no memory for {b} rows")
    return out
