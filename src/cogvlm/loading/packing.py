"""CPU inference on prepacked weights: every linear layer's weight reordered once into oneDNN's
blocked layout, so each product runs oneDNN's kernel on it (what `torch.compile` with freezing
does on the CPU), instead of MKL reading the row-major weight at every call.

Measured on a 2-core AVX-512 machine (32000 x 1024 weight, one thread): one row 8.1 -> 5.9 ms in
fp32 and 6.0 -> 3.7 ms in bf16, eight rows 25.3 -> 13.4 ms and 7.9 -> 5.0 ms. Inference only:
a packed layer has no gradient, and its weight is no longer a parameter (state_dict and saving
see none), so `cogvlm.load` packs only when the model is wholly on the CPU, unquantised, in
float32 or bfloat16; training and the drop-in class keep plain layers.
"""

from __future__ import annotations

import torch
from torch import nn

PACKABLE = (torch.float32, torch.bfloat16)


class PackedLinear(nn.Module):
    """`nn.Linear` for CPU inference on a weight packed for oneDNN; `weight` is the packed tensor
    (it keeps the dtype, device and shape; its storage is opaque)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        with torch.no_grad():
            self.weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 1)
            self.bias = None if linear.bias is None else linear.bias.detach().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed for oneDNN"


def can_pack() -> bool:
    """Whether this PyTorch build has oneDNN (every official CPU wheel does)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def pack_linears(model: nn.Module) -> int:
    """Replace every plain `nn.Linear` whose weight is a dense CPU tensor in float32 / bfloat16 by a
    `PackedLinear`, one at a time (the plain weight is freed as its packed copy is made); returns how
    many were packed."""
    if not can_pack():
        return 0
    count = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear and _plain_cpu(child.weight):
                setattr(module, name, PackedLinear(child))
                count += 1
    return count


def _plain_cpu(weight: torch.Tensor) -> bool:
    """A plain dense CPU tensor in fp32/bf16 (not a quantised tensor subclass, as a saved int8 folder holds)."""
    return type(weight.data) is torch.Tensor and weight.device.type == "cpu" and weight.dtype in PACKABLE
