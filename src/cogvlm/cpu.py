"""What this machine's CPU can run, as PyTorch finds it: the kernels picked for bf16 on the CPU
(`kernels.py`, the decode attention in `model/decoder.py`) depend on it."""

from __future__ import annotations

import functools
import platform

import torch


@functools.cache
def has(feature: str) -> bool:
    """Whether this is an x86-64 Linux CPU with the feature ("avx512_bf16", "amx_tile", "avx2_fma");
    False elsewhere or where this PyTorch cannot tell."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False
    if feature == "avx2_fma":  # what PyTorch's own AVX2 kernels need, so its capability says it
        return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    probe = getattr(torch.cpu, f"_is_{feature}_supported", None)
    return bool(probe and probe())


@functools.cache
def bf16_arithmetic() -> bool:
    """Whether oneDNN computes in bf16 on this CPU (AVX-512 BW/VL/DQ or AVX-NE-CONVERT). Without it
    (an AVX2-only CPU) oneDNN packs no bf16 weight and PyTorch's bf16 products and convolutions run
    on slow generic loops (a 1344-pixel patch convolution: 14 s against 0.26 s in fp32)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
