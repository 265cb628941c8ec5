"""How close our bf16 row kernel (`kernels.rows`, one row: a decode step's products) streams to the
memory's speed: one row times 40 weights of 1024 x 2816 (230 MB, well past the L3 cache, as a
decode step's weights are), against PyTorch summing the same bytes as bf16 and as fp32 (the fp32
sum is `cogvlm bench`'s bandwidth probe), in one process, best of 10 each.

    python benchmarks/row_stream.py [--rounds 10]

Printed: GB/s of each. Needs our CPU kernels (AVX512-BF16 or AVX2 and a C compiler).
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import torch

from cogvlm import kernels

SHAPE, COUNT = (2816, 1024), 40  # bench-490's MLP weight (out, in), 5.8 MB each in bf16


def best_gb_s(nbytes: int, work: Callable[[], object], rounds: int) -> float:
    """nbytes over the fastest of `rounds` runs of `work` (after two warm-ups), in GB/s."""
    times = []
    for i in range(rounds + 2):
        start = time.perf_counter()
        work()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return nbytes / min(times) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    if not kernels.available():
        raise SystemExit("our CPU kernels do not run here: nothing to measure")
    torch.manual_seed(0)
    weights = [kernels.pack(torch.randn(*SHAPE).bfloat16()) for _ in range(COUNT)]
    x = torch.randn(1, SHAPE[1]).bfloat16()
    nbytes = sum(w.numel() * w.element_size() for w in weights)
    flat16 = torch.cat([w.flatten() for w in weights])
    flat32 = torch.randn(nbytes // 4)
    print(f"weights {nbytes / 1e6:.0f} MB")
    products = best_gb_s(nbytes, lambda: [kernels.rows(x, w, None) for w in weights], args.rounds)
    print(f"row kernel     {products:.1f} GB/s")
    print(f"bf16 sum       {best_gb_s(nbytes, flat16.sum, args.rounds):.1f} GB/s")
    print(f"fp32 sum       {best_gb_s(nbytes, flat32.sum, args.rounds):.1f} GB/s")


if __name__ == "__main__":
    main()
