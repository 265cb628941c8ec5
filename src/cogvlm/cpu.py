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
