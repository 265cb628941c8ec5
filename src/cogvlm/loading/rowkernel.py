"""Our bf16 kernel for a few rows times a weight (the decode steps of a batch, on the CPU).

On a 2-core AVX-512 / AMX Xeon, oneDNN's and PyTorch's bf16 one-row kernels read a decoder-sized
weight at 14-18 GB/s where MKL's fp32 `mv` reads 24-27 GB/s (benchmarks/RESULTS.md, issue 19),
and a bf16 decode step is bound by those reads. `rowkernel.c` reads a weight in its own packed
layout at 21-27 GB/s from 1 row (`vdpbf16ps`) to 32 rows (AMX, where the CPU has it). It is built
with the system C compiler on first use, cached under `$XDG_CACHE_HOME/cogvlm/kernels` (written
atomically) and loaded with ctypes; its OpenMP threads are PyTorch's own (the process has one
libgomp). Where the CPU lacks AVX512-BF16, there is no compiler, or `COGVLM_ROW_KERNEL=0`,
`available()` is False and callers keep oneDNN.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import subprocess
import warnings
from pathlib import Path
from typing import Any

import torch

from .. import cpu
from ..fileio import atomic_write

SOURCE = Path(__file__).with_name("rowkernel.c")
FLAGS = ("-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mamx-tile", "-mamx-bf16", "-fopenmp")
FLAGS += ("-shared", "-fPIC")
BLOCK, DEPTH = 16, 32  # outputs per packed chunk; inputs per AMX tile row (K must be a multiple)
MAX_ROWS = {True: 128, False: 32}  # by AMX: rows up to which the kernel beats unpacking for oneDNN


def cache_folder() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cogvlm" / "kernels"


@functools.cache
def _library() -> tuple[ctypes.CDLL, bool] | None:
    """The built kernel (built now if not cached) and whether AMX serves; None (with one warning)
    where it cannot be built."""
    if os.environ.get("COGVLM_ROW_KERNEL", "1") == "0" or not cpu.has("avx512_bf16"):
        return None
    source = SOURCE.read_bytes()
    compiler = os.environ.get("CC", "cc")
    digest = hashlib.sha256(source + " ".join((compiler, *FLAGS)).encode()).hexdigest()[:16]
    built = cache_folder() / f"rowkernel-{digest}.so"
    try:
        if not built.exists():
            built.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(built, lambda tmp: _compile(compiler, tmp))
        lib = ctypes.CDLL(str(built))
    except (OSError, subprocess.SubprocessError) as err:
        warnings.warn(f"bf16 row kernel not built ({err}); oneDNN serves instead", stacklevel=3)
        return None
    for kernel in (lib.cogvlm_rows_bf16, lib.cogvlm_rows_bf16_amx):
        kernel.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
        kernel.argtypes += [ctypes.c_void_p, ctypes.c_long, ctypes.c_long]
        kernel.restype = None
    return lib, cpu.has("amx_tile") and torch.cpu._init_amx()  # _init_amx: Linux's leave to use the tiles


def _compile(compiler: str, out: str) -> None:
    done = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", out], capture_output=True, text=True, timeout=300)
    if done.returncode:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise subprocess.SubprocessError(f"{compiler} failed: {last}")


def available() -> bool:
    """Whether the kernel runs here (builds it on the first call)."""
    return _library() is not None


def fits(weight: torch.Tensor) -> bool:
    """A bf16 weight (O, K) the kernel takes: O a multiple of 16, K of 32."""
    out_features, in_features = weight.shape
    return weight.dtype == torch.bfloat16 and out_features % BLOCK == 0 and in_features % DEPTH == 0


def max_rows() -> int:
    """Rows up to which `rows` is faster than oneDNN on the weight unpacked (each call's unpacking
    copies the weight: 1.7-2 ms for 6 MB)."""
    built = _library()
    return 0 if built is None else MAX_ROWS[built[1]]


def pack(weight: torch.Tensor) -> torch.Tensor:
    """(O, K) -> the kernel's layout (O/16, K/2, 16, 2), contiguous."""
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
    lib, amx = built
    one_row = x.numel() == packed.shape[1] * 2
    return _product(lib.cogvlm_rows_bf16_amx if amx and not one_row else lib.cogvlm_rows_bf16, x, packed, bias)


def _product(kernel: Any, x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`rows` through the given one of rowkernel.c's two functions."""
    blocks, pairs = packed.shape[:2]
    flat = x.reshape(-1, pairs * 2).contiguous()  # (M, K)
    out = torch.empty(flat.shape[0], blocks * BLOCK, dtype=torch.bfloat16)  # (M, O)
    kernel(
        flat.data_ptr(),
        flat.shape[0],
        packed.data_ptr(),
        None if bias is None else bias.data_ptr(),
        out.data_ptr(),
        blocks * BLOCK,
        pairs * 2,
    )
    return out.view(*x.shape[:-1], blocks * BLOCK)
